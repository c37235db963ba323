"""Loading checkpoints into a ``HookedVLM``: finding and reading safetensors (``checkpoint``), strict
conversion with about one copy of the weights in memory (``load``). Weight processing runs through
TransformerLens's own code, one group at a time (``vlm_lens._tl.processing``)."""

from vlm_lens.loading.load import build_from_hf, load_pretrained, resolve_dtype

__all__ = ["build_from_hf", "load_pretrained", "resolve_dtype"]
