"""InternVL's settings (InternViT's norms, qk-norm and final norm, the pixel-shuffle factor, the projector's
activation) and how to read them from an HF ``InternVLConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.config import VisionConfig, VLMConfig, normalise_feature_layers


@dataclass(frozen=True)
class InternViTConfig(VisionConfig):
    """InternViT: a pre-norm ViT with a CLS token, learned positions and layer scale (folded into the weights)."""

    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    qk_norm: bool = False  # RMSNorm over all heads' queries and keys (eps 1e-6, as HF hard-codes it)
    has_final_norm: bool = False  # HF's ``layernorm`` after the blocks (use_mean_pooling=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm_type={self.norm_type!r}; InternViT uses 'layer_norm' or 'rms_norm'.")
        if self.image_size is None:
            raise ValueError("InternViT works on square tiles: vision image_size must be set.")


@dataclass(frozen=True)
class InternVLConfig(VLMConfig):
    """InternViT on square tiles, a pixel shuffle by ``scale_factor``, LayerNorm and a two-layer MLP.

    Each tile of ``vision.image_size`` px is ``grid_size`` x ``grid_size`` patches (plus the CLS token, which the
    projector never sees); the pixel shuffle turns every ``scale_factor`` x ``scale_factor`` block of patches into
    one language-model token, so a tile takes ``tile_side**2`` image tokens.
    """

    scale_factor: int = 2
    projector_act: str = "gelu"
    final_norm: bool = False  # the features pass the tower's final LayerNorm (HF: only for vision_feature_layer=-1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision, InternViTConfig):
            raise ValueError(f"InternVL needs an InternViTConfig, got {type(self.vision).__name__}.")
        if self.scale_factor <= 0 or self.vision.grid_size % self.scale_factor:
            raise ValueError(
                f"The pixel shuffle's factor {self.scale_factor} (1 / downsample_ratio) must divide the tile's "
                f"{self.vision.grid_size} patches a side; fix the checkpoint's downsample_ratio or vision_config.")
        if len(self.feature_layers) != 1:
            raise ValueError(f"InternVL reads one vision layer; feature_layers={self.feature_layers}.")
        if self.final_norm and not (self.vision.has_final_norm and self.feature_layers == (self.vision.n_layers,)):
            raise ValueError("final_norm=True needs a tower with a final norm (use_mean_pooling=False) read at its last "
                             "layer.")

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


def _square(value: Any, name: str) -> int:
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or pair[0] != pair[1] or not isinstance(pair[0], int):
        raise ValueError(f"vision_config.{name}={value!r}: vlm_lens supports square tiles and patches only.")
    return pair[0]


def _scale_factor(downsample_ratio: float) -> int:
    scale = round(1 / downsample_ratio)
    if downsample_ratio <= 0 or abs(scale * downsample_ratio - 1) > 1e-6:
        raise ValueError(f"downsample_ratio={downsample_ratio}: vlm_lens supports 1 / n (e.g. 0.5), a pixel shuffle "
                         "of n x n patches into one token.")
    return scale


def internvl_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, InternVLConfig]:
    vision = hf_config.vision_config
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: InternVL reads one layer (an int), as transformers does.")
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError(f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r}: InternVL "
                         "drops the CLS token ('default') to lay the patches on a square grid; fix the config.")
    if getattr(vision, "use_mask_token", False):
        raise ValueError("vision_config.use_mask_token=True (masked image modelling) is not supported; set it to False.")
    if not vision.use_absolute_position_embeddings:
        raise ValueError("vision_config.use_absolute_position_embeddings=False is not supported by vlm_lens.")
    vcfg = InternViTConfig(
        family="internvit", d_model=vision.hidden_size, n_heads=vision.num_attention_heads,
        d_mlp=vision.intermediate_size, n_layers=vision.num_hidden_layers,
        image_size=_square(vision.image_size, "image_size"), patch_size=_square(vision.patch_size, "patch_size"),
        eps=vision.layer_norm_eps, act_fn=vision.hidden_act, n_channels=vision.num_channels, has_class_token=True,
        norm_type=vision.norm_type, qk_norm=bool(vision.use_qk_norm), has_final_norm=not vision.use_mean_pooling,
    )
    vlm_cfg = InternVLConfig(
        architecture="InternVLForConditionalGeneration", vision=vcfg, image_token_id=hf_config.image_token_id,
        feature_layers=normalise_feature_layers(layer, vcfg.n_layers),
        scale_factor=_scale_factor(hf_config.downsample_ratio), projector_act=hf_config.projector_hidden_act,
        final_norm=layer == -1 and vcfg.has_final_norm,
    )
    return text_config_to_tl(hf_config.text_config, dtype, device), vlm_cfg
