"""The Qwen patch merger (the projector): a norm per patch, then a two-layer MLP per merged block. The norm
is the tower's kind: RMSNorm in Qwen2.5-VL, LayerNorm (with bias) in Qwen2-VL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.components import LayerNorm, RMSNorm
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens.architectures.qwen2_5_vl.config import Qwen2_5_VLConfig


class PatchMerger(nn.Module):
    """The projector: ``ln_q`` per patch, then ``W_out gelu(W_in x + b_in) + b_out`` per block.

    Hooks: ``projector.hook_in`` [n_tokens, merge**2 * d_vision] (the image features), ``projector.ln_q.*``
    [n_tokens, merge**2, d_vision], ``projector.hook_hidden`` after the GELU, ``projector.hook_out``
    [n_tokens, d_model].
    """

    def __init__(self, cfg: Qwen2_5_VLConfig, d_model: int, vision_cfg: HookedTransformerConfig):
        super().__init__()
        vcfg = cfg.vision
        self.n_merged = vcfg.spatial_merge_size**2
        d_in = vcfg.d_model * self.n_merged
        dtype = vision_cfg.dtype
        norm = LayerNorm if vision_cfg.normalization_type == "LN" else RMSNorm  # the tower's kind of norm
        self.ln_q = norm(vision_cfg, length=vcfg.d_model)  # shares the tower's config: dtype moves with it
        self.W_in = nn.Parameter(torch.empty(d_in, d_in, dtype=dtype))
        self.b_in = nn.Parameter(torch.empty(d_in, dtype=dtype))
        self.W_out = nn.Parameter(torch.empty(d_in, d_model, dtype=dtype))
        self.b_out = nn.Parameter(torch.empty(d_model, dtype=dtype))
        self.hook_in = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Float[torch.Tensor, "n_tokens d_features"]) -> Float[torch.Tensor, "n_tokens d_model"]:
        x = self.hook_in(features.to(self.W_in.dtype))
        x = self.ln_q(x.reshape(len(x), self.n_merged, -1)).reshape(len(x), -1)
        hidden = self.hook_hidden(F.gelu(torch.addmm(self.b_in, x, self.W_in)))
        return self.hook_out(torch.addmm(self.b_out, hidden, self.W_out))
