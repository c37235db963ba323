"""Qwen2-VL's vision tower: Qwen2.5-VL's (``HookedQwen2_5_VLVision``: dynamic resolution, 2-D rotary, patches
in raster order, the same hooks) with pre-LayerNorm blocks (with biases), a plain ``fc1 -> act -> fc2`` MLP
(TransformerLens's ``MLP``; quick-GELU by default) and no attention windows: every block attends over the
whole image, so each ``vision.blocks.{l}.attn.hook_pattern`` is zero only for padding and other images."""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.components import MLP
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.qwen2_5_vl.config import QwenVisionConfig
from vlm_lens.architectures.qwen2_5_vl.vision import HookedQwen2_5_VLVision, qwen_vision_block_config
from vlm_lens.vision.activations import quick_gelu

# Activations TransformerLens's config rejects: the config gets a stand-in, the MLP the real one.
_SET_ON_MLP = {"quick_gelu": quick_gelu}


class HookedQwen2VLVision(HookedQwen2_5_VLVision):
    """Patch embedding and LayerNorm blocks; returns the features the merger reads, one row per LM token.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.qwen2_vl.testing import make_hf, tiny_qwen2_vl_config
        >>> vision = HookedVLM.from_hf(make_hf(tiny_qwen2_vl_config())).vision  # 4-px patches, merged 2x2
        >>> vision(torch.randn(32, vision.patch_dim), torch.tensor([[1, 4, 8]])).shape  # 4x8 patches
        torch.Size([8, 64])
    """

    @staticmethod
    def block_config(vcfg: QwenVisionConfig, dtype: torch.dtype) -> HookedTransformerConfig:
        stand_in = "gelu" if vcfg.act_fn in _SET_ON_MLP else None
        return qwen_vision_block_config(vcfg, dtype, normalization_type="LN", gated_mlp=False, act_fn=stand_in)

    def make_mlp(self) -> nn.Module:
        mlp = MLP(self.cfg)
        if self.vision_cfg.act_fn in _SET_ON_MLP:
            mlp.act_fn = _SET_ON_MLP[self.vision_cfg.act_fn]
        return mlp
