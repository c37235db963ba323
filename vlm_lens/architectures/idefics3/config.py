"""Idefics3's and SmolVLM's settings (the tower's tile and patch sizes, the pixel-shuffle factor) and how to
read them from an HF ``Idefics3Config`` or ``SmolVLMConfig`` (the two share every field vlm_lens reads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.config import VisionConfig, VLMConfig


@dataclass(frozen=True)
class Idefics3Config(VLMConfig):
    """A SigLIP-like tower on square tiles, then a pixel shuffle by ``scale_factor`` and one linear map.

    Each tile of ``vision.image_size`` px is ``grid_size`` x ``grid_size`` patches; the pixel shuffle turns
    every ``scale_factor`` x ``scale_factor`` block of patches into one language-model token, so a tile
    takes ``tile_side**2`` image tokens.
    """

    scale_factor: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision.image_size is None:
            raise ValueError("Idefics3's tower works on square tiles: vision image_size must be set.")
        if self.scale_factor <= 0 or self.vision.grid_size % self.scale_factor:
            raise ValueError(
                f"scale_factor={self.scale_factor} must be positive and divide the tile's {self.vision.grid_size} "
                f"patches a side ({self.vision.image_size} px tiles of {self.vision.patch_size} px patches); "
                "fix the checkpoint's scale_factor or vision_config."
            )
        if self.feature_layers != (self.vision.n_layers,):
            raise ValueError(f"Idefics3 reads the tower's last layer only; feature_layers={self.feature_layers}.")

    @property
    def tile_side(self) -> int:
        """Image tokens a side of one tile (after the pixel shuffle)."""
        return self.vision.grid_size // self.scale_factor

    @property
    def tokens_per_tile(self) -> int:
        return self.tile_side**2

    @property
    def d_image_features(self) -> int:
        """Width of one token's features entering the projector: ``scale_factor**2`` patches side by side."""
        return self.vision.d_model * self.scale_factor**2


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"vision_config.{name}={value!r}: vlm_lens supports square tiles and patches only (an int).")
    return value


def idefics3_configs(hf_config: Any, dtype: torch.dtype, device: str, architecture: str
                     ) -> tuple[HookedTransformerConfig, Idefics3Config]:
    vision = hf_config.vision_config
    vcfg = VisionConfig(
        family="idefics3", d_model=vision.hidden_size, n_heads=vision.num_attention_heads,
        d_mlp=vision.intermediate_size, n_layers=vision.num_hidden_layers,
        image_size=_int(vision.image_size, "image_size"), patch_size=_int(vision.patch_size, "patch_size"),
        eps=vision.layer_norm_eps, act_fn=vision.hidden_act, n_channels=vision.num_channels, has_class_token=False,
    )
    vlm_cfg = Idefics3Config(architecture=architecture, vision=vcfg, feature_layers=(vcfg.n_layers,),
                             image_token_id=hf_config.image_token_id, scale_factor=hf_config.scale_factor)
    return text_config_to_tl(hf_config.text_config, dtype, device), vlm_cfg
