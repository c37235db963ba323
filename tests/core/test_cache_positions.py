"""run_with_cache keeping some positions (pos_slice, image_tokens_only) or moving to another device equals
the full cache at the kept positions; vision-side hooks stay whole."""

import pytest
import torch

from vlm_lens.caching import is_sequence_hook, position_dim
from vlm_lens.testing import seeded_image


@pytest.fixture(scope="module")
def padded(raw_model):
    """Two rows of different lengths: the image tokens sit at different positions (padding)."""
    return raw_model.prepare(["USER : <image>\nwhat ?", "USER : <image>\ndescribe the image please ASSISTANT :"],
                             images=[[seeded_image((16, 16), 0)], [seeded_image((16, 16), 1)]])


@pytest.fixture(scope="module")
def full(raw_model, padded):
    with torch.no_grad():
        return raw_model.run_with_cache(padded)


def test_image_tokens_only_equals_the_full_cache_at_image_positions(raw_model, padded, full):
    logits, cache = full
    with torch.no_grad():
        out, kept = raw_model.run_with_cache(padded, image_tokens_only=True)
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    assert set(kept.keys()) == set(cache.keys())
    rows, positions = padded.image_mask.nonzero(as_tuple=True)
    assert len(set(positions[rows == 0].tolist()) ^ set(positions[rows == 1].tolist())) > 0  # rows differ
    for name in cache.keys():
        if not is_sequence_hook(name):
            torch.testing.assert_close(kept[name], cache[name], rtol=0, atol=0)
            continue
        whole = cache[name].movedim(position_dim(name), 1)
        assert kept[name].shape == (len(rows), *whole.shape[2:]), name
        torch.testing.assert_close(kept[name], whole[rows, positions], rtol=0, atol=0)
        assert kept[name].untyped_storage().nbytes() == kept[name].numel() * kept[name].element_size()
    assert kept["blocks.0.attn.hook_pattern"].shape[-1] == padded.tokens.shape[1]  # every key position


@pytest.mark.parametrize("pos_slice", [-1, [2, 5], (1, 4)])
def test_pos_slice_equals_the_full_cache_sliced(raw_model, padded, pos_slice):
    from transformer_lens.utilities import Slice

    names = lambda n: n.startswith(("blocks.1", "vision.", "hook_"))  # noqa: E731
    with torch.no_grad():  # the same hooks (a hooked pattern runs attention explicitly: other rounding)
        _, cache = raw_model.run_with_cache(padded, names_filter=names)
        _, kept = raw_model.run_with_cache(padded, pos_slice=pos_slice, names_filter=names)
    sl = Slice.unwrap(pos_slice)  # as TransformerLens: an int keeps the dimension
    for name in kept.keys():
        expected = sl.apply(cache[name], dim=position_dim(name)) if is_sequence_hook(name) else cache[name]
        torch.testing.assert_close(kept[name], expected, rtol=0, atol=0, msg=name)
    assert "blocks.1.attn.hook_rot_q" in kept.keys() and "vision.blocks.0.hook_resid_post" in kept.keys()


def test_device_argument_moves_each_tensor(raw_model, padded, full):
    _, cache = full
    with torch.no_grad():
        _, moved = raw_model.run_with_cache(padded, device="meta", names_filter=lambda n: "resid_post" in n)
        _, kept = raw_model.run_with_cache(padded, device="meta", image_tokens_only=True,
                                           names_filter="blocks.0.hook_resid_post")
    assert all(t.device.type == "meta" for t in moved.values()) and len(moved) > 2
    assert kept["blocks.0.hook_resid_post"].shape == (int(padded.image_mask.sum()), raw_model.cfg.d_model)


def test_image_tokens_only_errors_teach(raw_model, padded):
    with pytest.raises(ValueError, match="drop pos_slice"):
        raw_model.run_with_cache(padded, image_tokens_only=True, pos_slice=1)
    with pytest.raises(ValueError, match="VLMInputs"):
        raw_model.run_with_cache("text", image_tokens_only=True)
