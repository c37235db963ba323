"""LLaVA-NeXT's settings: LLaVA's plus the any-resolution tilings (shared with LLaVA-OneVision)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.architectures.llava.config import LlavaConfig, llava_fields


@dataclass(frozen=True)
class AnyResConfig(LlavaConfig):
    """LLaVA's settings plus the tilings; ``vision_aspect_ratio`` is OneVision's ``anyres_max_N`` (or None)."""

    image_grid_pinpoints: tuple[tuple[int, int], ...]
    vision_aspect_ratio: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        tile = self.vision.image_size
        if not self.image_grid_pinpoints:
            raise ValueError("image_grid_pinpoints is empty; an any-resolution model needs at least one tiling.")
        for pinpoint in self.image_grid_pinpoints:
            if len(pinpoint) != 2 or any(side <= 0 or side % tile for side in pinpoint):
                raise ValueError(
                    f"image_grid_pinpoints entry {list(pinpoint)} is not a (height, width) pair of multiples of the "
                    f"vision tile size {tile}; fix image_grid_pinpoints in the checkpoint's config."
                )
        if self.n_image_tokens != self.vision.n_patches:
            raise ValueError(
                f"Any-resolution tiling packs {self.vision.grid_size}x{self.vision.grid_size} patch features per "
                f"tile, but the selected features have {self.n_image_tokens} tokens (the class token is kept); set "
                "vision_feature_select_strategy='default' to drop it."
            )
        if self.vision_aspect_ratio is not None and not re.fullmatch(r"anyres_max_\d+", self.vision_aspect_ratio):
            raise ValueError(
                f"vision_aspect_ratio={self.vision_aspect_ratio!r} is not supported; use 'anyres_max_<N>' (e.g. "
                "'anyres_max_9'), where N is the most tiles' worth of crop tokens kept before downsampling."
            )

    @property
    def max_crop_tiles(self) -> int | None:
        """N of ``vision_aspect_ratio="anyres_max_N"`` (LLaVA-OneVision), or None (no downsampling)."""
        return None if self.vision_aspect_ratio is None else int(self.vision_aspect_ratio.rsplit("_", 1)[1])


def anyres_configs(hf_config: Any, dtype: torch.dtype, device: str, *, architecture: str,
                   vision_aspect_ratio: str | None = None) -> tuple[HookedTransformerConfig, AnyResConfig]:
    """LLaVA's configs plus the any-resolution fields (shared by LLaVA-NeXT and LLaVA-OneVision)."""
    pinpoints = tuple(tuple(int(side) for side in p) for p in hf_config.image_grid_pinpoints)
    vlm_cfg = AnyResConfig(architecture=architecture, **llava_fields(hf_config), image_grid_pinpoints=pinpoints,
                           vision_aspect_ratio=vision_aspect_ratio)
    return text_config_to_tl(hf_config.text_config, dtype, device), vlm_cfg


def llava_next_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, AnyResConfig]:
    return anyres_configs(hf_config, dtype, device, architecture="LlavaNextForConditionalGeneration")
