"""Activations at image tokens streamed into SAE Lens's trainer, and SAEs saved and loaded in its format."""

from types import SimpleNamespace

import pytest
import torch
from sae_helpers import PROMPTS, rgb

from vlm_lens.sae import activation_batches, activation_rows, load_sae, train_sae

HOOK = "blocks.1.hook_resid_pre"


def _items(n, offset=0):
    return [SimpleNamespace(prompt=PROMPTS[i % 2], image=rgb(100 + offset + i)) for i in range(n)]


@pytest.mark.parametrize("positions", ["image", "text", "all"])
def test_activation_rows_are_the_cache_at_the_chosen_positions(sae_model, positions):
    items = _items(3)
    rows = torch.cat(list(activation_rows(sae_model, items, HOOK, positions=positions, batch_size=2)))
    expected = []
    for start in (0, 2):
        batch = items[start:start + 2]
        inputs = sae_model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
        _, cache = sae_model.run_with_cache(inputs, names_filter=HOOK)
        real, image = inputs.attention_mask.bool(), inputs.image_mask
        keep = {"image": image, "text": real & ~image, "all": real}[positions]
        expected.append(cache[HOOK][keep])
    assert torch.allclose(rows, torch.cat(expected))
    if positions == "image":
        assert len(rows) == 3 * 16  # 4 x 4 patches per image


def test_vision_hooks_give_every_token_and_reject_text(sae_model):
    rows = next(activation_rows(sae_model, _items(2), "vision.blocks.0.hook_resid_post"))
    assert rows.shape == (2 * 17, 24)  # CLS + 16 patches per image
    with pytest.raises(ValueError, match="language-model hook"):
        next(activation_rows(sae_model, _items(2), "vision.blocks.0.hook_resid_post", positions="text"))


def test_activation_batches_shuffle_and_repeat(sae_model):
    items = _items(4)
    batches = activation_batches(sae_model, items, HOOK, batch_size=8, buffer_batches=2, forward_batch_size=2)
    first = [next(batches) for _ in range(12)]  # 96 rows > the 64 the items give: the items run again
    assert all(b.shape == (8, 32) for b in first)
    once = torch.cat(list(activation_rows(sae_model, items, HOOK)))
    seen = torch.cat(first[:4])
    assert all((once - row).abs().sum(-1).min() < 1e-5 for row in seen)  # every row is a real activation
    assert not torch.equal(seen, once[:32])  # and they are mixed
    finite = list(activation_batches(sae_model, items, HOOK, batch_size=8, buffer_batches=2, repeat=False))
    assert len(finite) == 64 // 8


def test_train_sae_with_sae_lens_trainer_then_save_and_load(sae_model, tmp_path):
    items = _items(48)
    sae = train_sae(sae_model, items, HOOK, d_sae=64, k=4, training_samples=32 * 256, batch_size=256, lr=3e-3,
                    normalize_activations="none", out=str(tmp_path / "sae"))
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    held_out = torch.cat(list(activation_rows(sae_model, _items(8, offset=500), HOOK)))
    recon = sae.decode(sae.encode(held_out))
    assert ((recon - held_out) ** 2).sum() / (held_out**2).sum() < 0.1  # about 0.6 before training
    assert ((sae.encode(held_out) > 0).sum(-1) <= 4).all()
    loaded = load_sae(tmp_path / "sae")
    assert torch.equal(loaded.encode(held_out), sae.encode(held_out))
    with pytest.raises(ValueError, match="give exactly one of k"):
        train_sae(sae_model, items, HOOK, d_sae=8, k=None)
    with pytest.raises(ValueError, match="release and id"):
        load_sae(tmp_path / "missing")
    with pytest.raises(ValueError, match="no cfg.json"):
        load_sae(tmp_path)


def test_two_dimensional_image_hooks_give_one_row_per_token(tmp_path):
    """Qwen2.5-VL's hook_image_embeds is [total_tokens, d]: each token is a row (it came out [n * d, 1])."""
    from vlm_lens.architectures.qwen2_5_vl.testing import PROMPTS as QWEN_PROMPTS
    from vlm_lens.architectures.qwen2_5_vl.testing import save_qwen, seeded_image
    from vlm_lens.sae import HookedSAEVLM

    path, _ = save_qwen(tmp_path / "qwen")
    model = HookedSAEVLM.from_pretrained_no_processing(str(path))
    same = [SimpleNamespace(prompt=QWEN_PROMPTS[i], image=seeded_image((16, 16), seed=i)) for i in range(2)]
    inputs = model.prepare([it.prompt for it in same], images=[[it.image] for it in same])
    _, cache = model.run_with_cache(inputs, names_filter="hook_image_embeds")
    rows = next(activation_rows(model, same, "hook_image_embeds"))
    assert cache["hook_image_embeds"].ndim == 2 and torch.allclose(rows, cache["hook_image_embeds"])
    # a vision-tower hook stacks images of different sizes padded to the largest: refused in one batch,
    # one image per pass gives each image's own rows
    mixed = [same[0], SimpleNamespace(prompt=QWEN_PROMPTS[1], image=seeded_image((40, 24), seed=1))]
    hook = "vision.blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="padded to the largest"):
        next(activation_rows(model, mixed, hook))
    alone = torch.cat(list(activation_rows(model, mixed, hook, batch_size=1)))
    patches = [int(t.prod()) for t in model.prepare([it.prompt for it in mixed],
                                                    images=[[it.image] for it in mixed]).extras["image_grid_thw"]]
    assert alone.shape[0] == sum(patches)
