"""Qwen2.5-VL's settings (vision tower with windows and 2-D rotary, M-RoPE sections, the marker tokens)
and how to read them from an HF ``Qwen2_5_VLConfig``. ``qwen_vl_configs`` is the part Qwen2-VL shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.config import VisionConfig, VLMConfig


@dataclass(frozen=True)
class QwenVisionConfig(VisionConfig):
    """A dynamic-resolution tower: merged patch blocks, optional attention windows, 2-D rotary."""

    temporal_patch_size: int = 2  # frames per patch (a still image is repeated)
    spatial_merge_size: int = 2  # side of the patch block the merger turns into one token
    window_size: int | None = None  # side of an attention window in pixels; None: every block is global
    full_attention_layers: tuple[int, ...] = ()  # blocks that attend over the whole image despite window_size
    rotary_base: float = 10000.0  # theta of the 2-D rotary embedding

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is not None:
            raise ValueError(f"A Qwen vision tower takes images of any size: image_size must be None, got {self.image_size}.")
        if self.spatial_merge_size <= 0 or self.temporal_patch_size <= 0:
            raise ValueError(f"spatial_merge_size={self.spatial_merge_size} and temporal_patch_size="
                             f"{self.temporal_patch_size} must be positive.")
        if self.d_head % 4:
            raise ValueError(f"vision head size {self.d_head} must be a multiple of 4 (2-D rotary: half the "
                             "frequencies for rows, half for columns).")
        merged_patch = self.patch_size * self.spatial_merge_size
        if self.window_size is not None and self.window_size < merged_patch:
            raise ValueError(
                f"window_size={self.window_size} px is smaller than one merged token ({self.spatial_merge_size}x"
                f"{self.spatial_merge_size} patches of {self.patch_size} px = {merged_patch} px); fix window_size."
            )
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"full_attention_layers {bad} are out of range for a tower of {self.n_layers} blocks.")

    @property
    def window_tokens(self) -> int | None:
        """Side of an attention window in merged tokens, or None without windows."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class Qwen2_5_VLConfig(VLMConfig):
    """M-RoPE sections of the language model and the tokens around each image's tokens."""

    mrope_section: tuple[int, ...]  # rotary frequencies given to (time, row, column) positions
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision, QwenVisionConfig):
            raise ValueError(f"{self.architecture} needs a QwenVisionConfig, got {type(self.vision).__name__}.")
        if len(self.mrope_section) != 3 or any(s < 0 for s in self.mrope_section):
            raise ValueError(f"mrope_section={list(self.mrope_section)} must be 3 non-negative numbers "
                             "(time, row, column).")


class _AsQwen2:
    """A Qwen2-VL / Qwen2.5-VL text config read as a Qwen2 one (same weights, names and shapes)."""

    model_type = "qwen2"

    def __init__(self, text_config: Any):
        self._config = text_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def int_setting(value: Any, name: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"vision_config.{name}={value!r}: vlm_lens supports square patches only (an int).")
    return value


# What transformers' Qwen2-VL and Qwen2.5-VL rotary use when the checkpoint gives no mrope_section.
HF_DEFAULT_MROPE_SECTION = (16, 24, 24)


def qwen_vl_configs(hf_config: Any, vcfg: QwenVisionConfig, merger_out: int, architecture: str, dtype: torch.dtype,
                    device: str) -> tuple[HookedTransformerConfig, Qwen2_5_VLConfig]:
    """What Qwen2-VL and Qwen2.5-VL share: the Qwen2 language model with M-RoPE, read from ``hf_config``,
    around the family's tower ``vcfg`` whose merger outputs ``merger_out`` features per token."""
    text = hf_config.text_config
    cfg = text_config_to_tl(_AsQwen2(text), dtype, device)
    if cfg.d_head != text.hidden_size // text.num_attention_heads:
        raise ValueError(f"head_dim={cfg.d_head}, but {architecture}'s attention uses hidden_size / heads = "
                         f"{text.hidden_size // text.num_attention_heads}; this checkpoint variant is not supported.")
    section = tuple(int(s) for s in text.rope_parameters.get("mrope_section", HF_DEFAULT_MROPE_SECTION))
    if sum(section) != cfg.d_head // 2 or len(section) != 3:
        raise ValueError(f"rope_parameters['mrope_section']={list(section)} must be 3 numbers adding up to "
                         f"head_dim / 2 = {cfg.d_head // 2}; fix the checkpoint's text_config.")
    if merger_out != text.hidden_size:
        raise ValueError(f"The vision merger outputs {merger_out} features per token but the language model's "
                         f"hidden_size is {text.hidden_size}; the merger's output could not enter the sequence.")
    vlm_cfg = Qwen2_5_VLConfig(
        architecture=architecture, vision=vcfg, feature_layers=(vcfg.n_layers,),
        image_token_id=hf_config.image_token_id, mrope_section=section,
        vision_start_token_id=hf_config.vision_start_token_id, vision_end_token_id=hf_config.vision_end_token_id,
    )
    return cfg, vlm_cfg


def qwen2_5_vl_configs(hf_config: Any, dtype: torch.dtype, device: str
                       ) -> tuple[HookedTransformerConfig, Qwen2_5_VLConfig]:
    vision = hf_config.vision_config
    vcfg = QwenVisionConfig(
        family="qwen2_5_vl", d_model=vision.hidden_size, n_heads=vision.num_heads, d_mlp=vision.intermediate_size,
        n_layers=vision.depth, image_size=None, patch_size=int_setting(vision.patch_size, "patch_size"),
        eps=1e-6,  # transformers hard-codes it for the vision blocks and the merger
        act_fn=vision.hidden_act, n_channels=vision.in_channels, has_class_token=False,
        temporal_patch_size=int_setting(vision.temporal_patch_size, "temporal_patch_size"),
        spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
        full_attention_layers=tuple(int(i) for i in vision.fullatt_block_indexes),
        rotary_base=float(vision.rope_parameters["rope_theta"]),
    )
    return qwen_vl_configs(hf_config, vcfg, vision.out_hidden_size, "Qwen2_5_VLForConditionalGeneration", dtype,
                           device)
