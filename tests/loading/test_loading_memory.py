"""The loader's memory discipline: weights processed one block at a time (equality with TransformerLens's
processing is in tests/_tl/test_folding.py), each source freed once moved; sharded and pickle checkpoints.

Peak resident memory itself is measured by the benchmarks (benchmarks/probes.py), not here.
"""

import weakref

import torch

import vlm_lens.loading.load as loading
from vlm_lens import HookedVLM
from vlm_lens.architectures.llava.testing import make_hf_llava, save_llava, tiny_llava_config
from vlm_lens.loading.checkpoint import safetensors_files
from vlm_lens.testing import image_prompt_tokens, random_pixels

STEPS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def test_each_block_is_freed_once_moved(monkeypatch):
    """After a block's attention or MLP is processed, the HF tensors it came from are gone."""
    hf = make_hf_llava(tiny_llava_config(), seed=2)
    layers = hf.model.language_model.layers
    sources = {}
    for i, layer in enumerate(layers):
        attn = [*layer.self_attn.parameters(), layer.input_layernorm.weight]
        mlp = [*layer.mlp.parameters(), layer.post_attention_layernorm.weight]
        sources[f"blocks.{i}.attn"] = [weakref.ref(p) for p in attn]
        sources[f"blocks.{i}.mlp"] = [weakref.ref(p) for p in mlp]
    del attn, mlp, layer
    sources["unembed"] = [weakref.ref(hf.lm_head.weight)]
    alive_after = {}
    real = loading.process_group

    def watched(name, part, cfg, steps, copy_first=()):
        out = real(name, part, cfg, steps, copy_first)
        if name in sources:
            alive_after[name] = sum(ref() is not None for ref in sources[name])
        return out

    monkeypatch.setattr(loading, "process_group", watched)
    holder = [hf]
    del hf, layers
    model = loading.build_from_hf(HookedVLM, holder, None, processing=STEPS)
    assert set(alive_after) == set(sources)
    assert alive_after == {name: 0 for name in sources}
    assert not holder and isinstance(model, HookedVLM)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single, hf = save_llava(tmp_path / "single", tiny_llava_config())
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    files = safetensors_files(str(sharded))
    assert files is not None and len(files) > 1
    tokens, pixels = image_prompt_tokens(16, batch=2), random_pixels(2)
    with torch.no_grad():
        ref = HookedVLM.from_pretrained_no_processing(str(single))(tokens, pixel_values=pixels)
        got = HookedVLM.from_pretrained_no_processing(str(sharded))(tokens, pixel_values=pixels)
        hf_logits = hf.eval()(input_ids=tokens, pixel_values=pixels).logits
    assert torch.equal(got, ref)
    assert (got - hf_logits).abs().max() <= 1e-4


def test_pickle_checkpoint_loads_with_the_flag(tmp_path):
    path, hf = save_llava(tmp_path, tiny_llava_config())
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    assert safetensors_files(str(path)) is None
    model = HookedVLM.from_pretrained_no_processing(str(path), allow_pickle=True)
    tokens, pixels = image_prompt_tokens(16), random_pixels(1)
    with torch.no_grad():
        diff = (model(tokens, pixel_values=pixels) - hf.eval()(input_ids=tokens, pixel_values=pixels).logits)
    assert diff.abs().max() <= 1e-4


def test_processing_in_place_never_writes_the_checkpoint(tmp_path):
    """Processing writes into weights memory-mapped from the file: the mapping must be private."""
    import hashlib

    path, _ = save_llava(tmp_path, tiny_llava_config("qwen2"))
    digest = lambda: hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    before = digest()
    raw = HookedVLM.from_pretrained_no_processing(str(path))
    processed = HookedVLM.from_pretrained(str(path))
    assert not torch.equal(processed.blocks[0].attn.W_Q, raw.blocks[0].attn.W_Q)  # it did write
    assert digest() == before
    again = HookedVLM.from_pretrained_no_processing(str(path))
    assert torch.equal(again.blocks[0].attn.W_Q, raw.blocks[0].attn.W_Q)
