"""LLaVA's settings and how to read them from an HF ``LlavaConfig`` (the LLaVA line shares them); with a
Pixtral tower (Pixtral-12B), ``LlavaPixtralConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.architectures.pixtral.config import PixtralVLMConfig, pixtral_vision_config
from vlm_lens.config import VisionConfig, VLMConfig, normalise_feature_layers
from vlm_lens.vision.convert import clip_vision_config, siglip_vision_config

SelectStrategy = Literal["default", "full"]

# The tower is chosen from ``vision_config.model_type``.
VISION_CONFIGS = {"clip_vision_model": clip_vision_config, "siglip_vision_model": siglip_vision_config}
# LLaVA only (not NeXT or OneVision): a Pixtral tower reads images of any size, through the Pixtral pipeline.
PIXTRAL_TOWER = "pixtral"


@dataclass(frozen=True)
class LlavaConfig(VLMConfig):
    """LLaVA-1.5: which features the projector reads and the projector's shape."""

    select_strategy: str  # SelectStrategy: "default" (drop the class token) or "full"; checked below
    projector_act: str
    projector_bias: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={self.select_strategy!r} is not supported; "
                "use 'default' (drop the class token) or 'full'."
            )
        if self.select_strategy == "default" and not self.vision.has_class_token:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the class token, but the {self.vision.family} "
                "tower has none (it would drop a patch); set vision_feature_select_strategy='full'."
            )

    @property
    def drop_class_token(self) -> bool:
        return self.select_strategy == "default" and self.vision.has_class_token

    @property
    def n_image_tokens(self) -> int:
        """Visual tokens one tile contributes (one image, for LLaVA-1.5)."""
        return self.vision.n_positions - int(self.drop_class_token)


@dataclass(frozen=True)
class LlavaPixtralConfig(LlavaConfig, PixtralVLMConfig):
    """LLaVA with a Pixtral tower (Pixtral-12B): images of any size, one image token per patch (no merger,
    so ``spatial_merge_size`` is 1), ``[IMG_BREAK]`` after each row and ``[IMG_END]`` after the image, then
    LLaVA's two-layer projector on the selected layer(s)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spatial_merge_size != 1:
            raise ValueError(f"spatial_merge_size={self.spatial_merge_size}: LLaVA's projector has no patch "
                             "merger, so each patch is one image token; set spatial_merge_size=1.")


def vision_config(hf_vision: Any) -> VisionConfig:
    model_type = getattr(hf_vision, "model_type", None)
    if model_type not in VISION_CONFIGS:
        raise ValueError(
            f"Unsupported vision tower {model_type!r}; supported: {', '.join(sorted(VISION_CONFIGS))}."
        )
    return VISION_CONFIGS[model_type](hf_vision)


def llava_fields(hf_config: Any, vision: VisionConfig | None = None) -> dict[str, Any]:
    """The ``LlavaConfig`` fields of an HF LLaVA-line config (NeXT and OneVision add their own); ``vision``: the
    tower's config if already read (default: one of ``VISION_CONFIGS``)."""
    vision = vision or vision_config(hf_config.vision_config)
    return dict(
        vision=vision,
        feature_layers=normalise_feature_layers(hf_config.vision_feature_layer, vision.n_layers),
        select_strategy=hf_config.vision_feature_select_strategy,
        image_token_id=hf_config.image_token_id,
        projector_act=hf_config.projector_hidden_act,
        projector_bias=getattr(hf_config, "multimodal_projector_bias", True),
    )


def llava_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, LlavaConfig]:
    """``LlavaConfig``, or ``LlavaPixtralConfig`` where ``vision_config.model_type`` is "pixtral"."""
    name = "LlavaForConditionalGeneration"
    if getattr(hf_config.vision_config, "model_type", None) == PIXTRAL_TOWER:
        fields = llava_fields(hf_config, pixtral_vision_config(hf_config.vision_config))
        vlm_cfg = LlavaPixtralConfig(architecture=name, spatial_merge_size=1, **fields)
    else:
        vlm_cfg = LlavaConfig(architecture=name, **llava_fields(hf_config))
    return text_config_to_tl(hf_config.text_config, dtype, device), vlm_cfg
