"""Qwen2-VL's settings, read from an HF ``Qwen2VLConfig``: a Qwen tower without windows (every block attends
over the whole image) and the language-model part it shares with Qwen2.5-VL (``qwen_vl_configs``)."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.qwen2_5_vl.config import (
    Qwen2_5_VLConfig,
    QwenVisionConfig,
    int_setting,
    qwen_vl_configs,
)

# HF activation names whose function TransformerLens has under the same name, plus CLIP's quick_gelu (set on
# the MLP by the tower, since TransformerLens's config rejects it).
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


def qwen2_vl_configs(hf_config: Any, dtype: torch.dtype, device: str
                     ) -> tuple[HookedTransformerConfig, Qwen2_5_VLConfig]:
    vision = hf_config.vision_config
    rope = vision.rope_parameters or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision_config.rope_parameters rope_type={rope['rope_type']!r}: Qwen2-VL's tower uses "
                         "the 'axial' 2-D rotary only; fix the checkpoint's vision_config.")
    if vision.hidden_act not in ACTIVATIONS:
        raise ValueError(f"vision_config.hidden_act={vision.hidden_act!r} is not supported; use one of {ACTIVATIONS}.")
    vcfg = QwenVisionConfig(
        family="qwen2_vl", d_model=vision.embed_dim, n_heads=vision.num_heads,
        d_mlp=int(vision.embed_dim * vision.mlp_ratio),  # as transformers sizes fc1
        n_layers=vision.depth, image_size=None, patch_size=int_setting(vision.patch_size, "patch_size"),
        eps=1e-6,  # transformers hard-codes it for the vision blocks and the merger
        act_fn=vision.hidden_act, n_channels=vision.in_channels, has_class_token=False,
        temporal_patch_size=int_setting(vision.temporal_patch_size, "temporal_patch_size"),
        spatial_merge_size=vision.spatial_merge_size, window_size=None,
        rotary_base=float(rope.get("rope_theta", 10000.0)),
    )
    # vision_config.hidden_size is the merger's output width (the tower's own width is embed_dim)
    return qwen_vl_configs(hf_config, vcfg, vision.hidden_size, "Qwen2VLForConditionalGeneration", dtype, device)
