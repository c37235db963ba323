"""Qwen3-VL's patch mergers: the projector, and one deepstack merger per deepstack layer."""

from __future__ import annotations

from transformer_lens.components import LayerNorm
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.qwen2_5_vl.merger import PatchMerger
from vlm_lens.architectures.qwen3_vl.config import Qwen3VLConfig


class Qwen3PatchMerger(PatchMerger):
    """Qwen2.5-VL's merger with a LayerNorm (weight and bias) in place of its RMSNorm.

    The projector (``postshuffle=False``) normalises each patch, as Qwen2.5-VL does; a deepstack merger
    (``postshuffle=True``) normalises the whole merged block of ``merge**2`` patches at once. Hooks as
    ``PatchMerger``: ``hook_in`` [n_tokens, merge**2 * d_vision], ``ln_q.hook_normalized``, ``hook_hidden``,
    ``hook_out`` [n_tokens, d_model].
    """

    def __init__(self, cfg: Qwen3VLConfig, d_model: int, vision_cfg: HookedTransformerConfig,
                 postshuffle: bool = False):
        super().__init__(cfg, d_model, vision_cfg)
        if postshuffle:
            self.n_merged = 1  # the norm's groups per token: one group of merge**2 * d_vision features
        self.ln_q = LayerNorm(vision_cfg, length=self.W_in.shape[0] // self.n_merged)
