"""Edge cases of extract(): batches that keep no row, image hooks whose rows are not in sequence order, a
cross-attention model, and a call that failed before its first shard."""

import pytest
import torch

from vlm_lens import activations, organism
from vlm_lens.activations.capture import RowCapture
from vlm_lens.activations.positions import select
from vlm_lens.activations.shards import ShardBuffer

from .common import no_hooks_left


def _items(n):
    data = organism.ShapesDataset("test", seed=0, size=n)
    return [dict(prompt=data[i].prompt, image=data[i].image) for i in range(n)]


def test_batches_that_keep_no_row_are_written_empty(model, tmp_path):
    items = _items(2) + [dict(prompt="what colour is the square ?", image=None),
                         dict(prompt="what shape is it ?", image=None)]
    store = activations.extract(model, items, hooks=["blocks.1.hook_resid_post"], positions="image",
                                out=tmp_path / "image", batch_size=2, progress=False)
    assert store.tensor("blocks.1.hook_resid_post").shape == (18, model.cfg.d_model)  # 2 items x 9 patches
    for nothing in (lambda inputs, item: [], lambda inputs, item: torch.zeros(0, dtype=torch.long)):
        out = tmp_path / f"none{len(list(tmp_path.iterdir()))}"
        store = activations.extract(model, items, hooks=["blocks.1.hook_resid_post"], positions=nothing, out=out,
                                    batch_size=2, progress=False)
        assert store.tensor("blocks.1.hook_resid_post").shape[0] == 0
    assert no_hooks_left(model)


def test_a_call_that_failed_before_its_first_shard_can_be_retried_with_other_arguments(model, tmp_path):
    out = tmp_path / "acts"
    with pytest.raises(ValueError, match="did not fire"):
        activations.extract(model, _items(2), hooks=["blocks.0.attn.hook_result"], positions="image", out=out,
                            progress=False)
    assert (out / "arguments.json").exists() and not list(out.rglob("*.safetensors"))
    store = activations.extract(model, _items(2), hooks=["blocks.0.hook_resid_post"], positions="image", out=out,
                                progress=False)
    assert len(store) == 18
    with pytest.raises(ValueError, match="cannot be stored"):
        activations.extract(model, _items(2), hooks=["blocks.0.hook_resid_post"], out=tmp_path / "f8",
                            dtype=torch.float8_e4m3fn, progress=False)
    assert not (tmp_path / "f8").exists()


def test_image_hook_rows_must_match_each_images_token_count(model):
    """A tiled tower's [n_tiles, patches, d] can hold as many rows as the batch has image tokens, in another
    order (LLaVA-NeXT: tiles, no newline tokens): only [n_images, tokens, d] per image, or [total, d], pass."""
    inputs = model.prepare([it["prompt"] for it in _items(2)], images=[[it["image"]] for it in _items(2)],
                           padding_side="right")
    selection = select("image", inputs, [None, None], [0, 1])
    capture = RowCapture(["hook_image_embeds"], None)
    hook = capture.fwd_hooks()[0][1]
    name = type("Hook", (), {"name": "hook_image_embeds"})()
    sizes = [s.n_embeds for s in inputs.layout.spans]
    assert sizes == [9, 9]
    for shape in ((2, 9, 4), (18, 4), (18, 2, 2)):  # per image, [total, d], a merger's [total, merged, d]
        buffer = ShardBuffer(["hook_image_embeds"])
        with capture.batch(selection, inputs.image_mask, buffer, sizes):
            hook(torch.randn(shape), name)
        assert buffer.parts["hook_image_embeds"][0].shape == (18, 4)
    with pytest.raises(ValueError, match="one row per image token"):
        with capture.batch(selection, inputs.image_mask, ShardBuffer(["hook_image_embeds"]), sizes):
            hook(torch.randn(3, 6, 4), name)  # 18 rows, but not 9 per image


def test_cross_attention_model_rows_and_refusals(tmp_path):
    from vlm_lens import HookedVLM
    from vlm_lens.architectures.mllama.testing import save_mllama
    from vlm_lens.testing import seeded_image

    path, _ = save_mllama(tmp_path / "mllama")
    model = HookedVLM.from_pretrained_no_processing(str(path))
    ph = model.processor.image_token
    items = [dict(prompt=f"{ph} " + "what is this ? " * 8, image=seeded_image((20, 30), seed=i)) for i in range(2)]
    store = activations.extract(model, items, hooks=["blocks.0.hook_resid_post"], positions="all",
                                out=tmp_path / "all", batch_size=2, progress=False)
    inputs = model.prepare(items[0]["prompt"], images=[items[0]["image"]])
    rows = store.rows
    n = inputs.tokens.shape[1]
    assert len(store) == 2 * n
    placeholder = int(inputs.image_mask[0].nonzero()[0, 0])
    labelled = (rows.column("image") >= 0).nonzero().flatten().tolist()  # only each placeholder names its image
    assert labelled == [placeholder, n + placeholder]
    assert int((rows.column("grid_row") >= 0).sum()) == 0  # no grid cells: the grids index image keys
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_post")
    assert torch.allclose(store.tensor("blocks.0.hook_resid_post")[:n], cache["blocks.0.hook_resid_post"][0], atol=1e-5)
    layer = model.vlm_cfg.cross_attention_layers[0]
    for hooks, words in (([f"blocks.{layer}.cross_attn.hook_k"], "image keys"), (["hook_image_embeds"], "cross-attention")):
        with pytest.raises(ValueError, match=words):
            activations.extract(model, items, hooks=hooks, positions="image", out=tmp_path / "bad", progress=False)
    assert no_hooks_left(model)
