"""Qwen3-VL's settings and how to read them from an HF ``Qwen3VLConfig``.

The vision tower is Qwen2.5-VL's without windows (``QwenVisionConfig``) plus a learned position table and
the deepstack layers; the language model is Qwen3 (Qwen2's layout, no q/k/v biases, RMSNorm on each query
and key head) with interleaved M-RoPE, read through TransformerLens's Qwen3 settings (``use_qk_norm``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.architectures.qwen2_5_vl.config import Qwen2_5_VLConfig, QwenVisionConfig, _AsQwen2, int_setting

ARCHITECTURE = "Qwen3VLForConditionalGeneration"


@dataclass(frozen=True)
class Qwen3VisionConfig(QwenVisionConfig):
    """Full attention in every block, a learned ``side x side`` position table resampled to each image's
    patch grid, and the blocks whose outputs feed the deepstack mergers."""

    n_position_embeddings: int = 2304  # side**2 entries
    deepstack_layers: tuple[int, ...] = ()  # block indices (0-based, increasing); LM layer k gets the k-th

    def __post_init__(self) -> None:
        super().__post_init__()
        side = math.isqrt(self.n_position_embeddings)
        if side < 1 or side * side != self.n_position_embeddings:
            raise ValueError(f"num_position_embeddings={self.n_position_embeddings} must be a square (a side x side "
                             "table of learned positions).")
        if self.window_size is not None:
            raise ValueError(f"Qwen3-VL's tower has no attention windows; got window_size={self.window_size}.")
        bad = [i for i in self.deepstack_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are out of range for a tower of {self.n_layers} blocks.")
        if list(self.deepstack_layers) != sorted(set(self.deepstack_layers)):
            raise ValueError(f"deepstack_visual_indexes {list(self.deepstack_layers)} must be increasing: LM layer k "
                             "receives the k-th deepstack block's features.")

    @property
    def position_side(self) -> int:
        return math.isqrt(self.n_position_embeddings)


@dataclass(frozen=True)
class Qwen3VLConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL's fields (M-RoPE sections, marker tokens); the tower is a ``Qwen3VisionConfig``.

    ``mrope_section`` is read interleaved (frequency ``j`` turns with the row if ``j % 3 == 1``, the column if
    ``j % 3 == 2``, within ``3 * section``), not in consecutive chunks as in Qwen2.5-VL.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision, Qwen3VisionConfig):
            raise ValueError(f"Qwen3-VL needs a Qwen3VisionConfig, got {type(self.vision).__name__}.")

    @property
    def n_deepstack(self) -> int:
        """Language-model layers (the first ones) that receive deepstack features."""
        return len(self.vision.deepstack_layers)


def _language_config(text: Any, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
    """TransformerLens's Qwen3 settings: Qwen2's read through ``text_config_to_tl``, plus q/k RMSNorm."""
    if getattr(text, "attention_bias", False):
        raise ValueError("text_config.attention_bias=True: TransformerLens's Qwen3 converter has no q/k/v/o biases, "
                         "so this checkpoint variant is not supported.")
    cfg = text_config_to_tl(_AsQwen2(text), dtype, device)
    return dataclasses.replace(cfg, use_qk_norm=True, original_architecture="Qwen3ForCausalLM")


def qwen3_vl_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, Qwen3VLConfig]:
    text, vision = hf_config.text_config, hf_config.vision_config
    cfg = _language_config(text, dtype, device)
    params = text.rope_parameters or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"text_config.rope_parameters['rope_type']={params['rope_type']!r}: only 'default' is "
                         "supported with M-RoPE.")
    section = tuple(int(s) for s in params.get("mrope_section", ()))
    if sum(section) != cfg.d_head // 2 or len(section) != 3:
        raise ValueError(f"rope_parameters['mrope_section']={list(section)} must be 3 numbers adding up to "
                         f"head_dim / 2 = {cfg.d_head // 2}; fix the checkpoint's text_config.")
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"vision_config.out_hidden_size={vision.out_hidden_size} differs from the language model's "
                         f"hidden_size={text.hidden_size}; the merger's output could not enter the sequence.")
    deepstack = tuple(int(i) for i in vision.deepstack_visual_indexes)
    if len(deepstack) > cfg.n_layers:
        raise ValueError(f"deepstack_visual_indexes has {len(deepstack)} entries but the language model has only "
                         f"{cfg.n_layers} layers to receive them; fix the checkpoint's vision_config.")
    vcfg = Qwen3VisionConfig(
        family="qwen3_vl", d_model=vision.hidden_size, n_heads=vision.num_heads, d_mlp=vision.intermediate_size,
        n_layers=vision.depth, image_size=None, patch_size=int_setting(vision.patch_size, "patch_size"),
        eps=1e-6,  # transformers hard-codes it for the vision blocks and the mergers
        act_fn=vision.hidden_act, n_channels=vision.in_channels, has_class_token=False,
        temporal_patch_size=int_setting(vision.temporal_patch_size, "temporal_patch_size"),
        spatial_merge_size=vision.spatial_merge_size, window_size=None,
        rotary_base=float((vision.rope_parameters or {}).get("rope_theta", 10000.0)),
        n_position_embeddings=vision.num_position_embeddings, deepstack_layers=deepstack,
    )
    vlm_cfg = Qwen3VLConfig(
        architecture=ARCHITECTURE, vision=vcfg, feature_layers=(vcfg.n_layers,),
        image_token_id=hf_config.image_token_id, mrope_section=section,
        vision_start_token_id=hf_config.vision_start_token_id, vision_end_token_id=hf_config.vision_end_token_id,
    )
    return cfg, vlm_cfg
