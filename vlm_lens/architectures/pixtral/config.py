"""The Pixtral tower's settings, what every model on it shares (``PixtralVLMConfig``), Mistral 3's own (patch
merger, projector) and how to read them from an HF ``Mistral3Config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.config import VisionConfig, VLMConfig, normalise_feature_layers

# transformers hard-codes the epsilon of every RMSNorm inside the Pixtral tower (ln_pre and the blocks).
PIXTRAL_EPS = 1e-5


@dataclass(frozen=True)
class PixtralVisionConfig(VisionConfig):
    """The Pixtral tower: images of any size (each brings its own patch grid), a 2-D rotary, no class token."""

    rotary_base: float = 10000.0  # theta of the 2-D (row, column) rotary embedding
    max_image_size: int | None = None  # the checkpoint's ``image_size``: the longest side the processor makes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is not None:
            raise ValueError(f"The Pixtral tower takes images of any size: image_size must be None, got {self.image_size}.")
        if self.has_class_token:
            raise ValueError("The Pixtral tower has no class token; set has_class_token=False.")
        if self.d_head % 4:
            raise ValueError(f"vision head size {self.d_head} must be a multiple of 4 (2-D rotary: a quarter of the "
                             "dimensions turn with the row, a quarter with the column, then both again).")


@dataclass(frozen=True)
class PixtralVLMConfig(VLMConfig):
    """A model whose images go through the Pixtral tower, one image token per ``spatial_merge_size``-sided block of
    patches, each row of tokens closed by ``[IMG_BREAK]`` and the image by ``[IMG_END]``: what the tower
    (``vision``) and the pipeline (``pipeline``) read. Mistral 3 merges 2x2 patches; LLaVA with a Pixtral tower
    (``vlm_lens.architectures.llava``) has no merger (1)."""

    spatial_merge_size: int  # side of the patch block that makes one image token

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision, PixtralVisionConfig):
            raise ValueError(f"{self.architecture} needs a PixtralVisionConfig, got {type(self.vision).__name__}.")
        if self.spatial_merge_size <= 0:
            raise ValueError(f"spatial_merge_size={self.spatial_merge_size} must be positive.")

    @property
    def token_size(self) -> int:
        """Side of one image token in processed pixels: ``patch_size * spatial_merge_size``."""
        return self.vision.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class Mistral3Config(PixtralVLMConfig):
    """The patch merger and projector of Mistral 3."""

    projector_act: str
    projector_bias: bool
    projector_eps: float  # the projector's RMSNorm (transformers takes the text model's rms_norm_eps)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.feature_layers) != 1:
            raise ValueError(f"vision_feature_layer selects {len(self.feature_layers)} layers; Mistral 3's projector "
                             "normalises and merges one layer's features (transformers' too). Give one int.")


def _int_setting(value: Any, name: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"vision_config.{name}={value!r}: vlm_lens supports square patches and images only (an int).")
    return value


def pixtral_vision_config(hf_vision: Any) -> PixtralVisionConfig:
    rope = dict(getattr(hf_vision, "rope_parameters", None) or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision rope_type {rope.get('rope_type')!r}: the Pixtral tower has an axial 2-D rotary only.")
    head_dim = getattr(hf_vision, "head_dim", None)
    if head_dim is not None and head_dim != hf_vision.hidden_size // hf_vision.num_attention_heads:
        raise ValueError(f"vision head_dim={head_dim}, but Pixtral's attention uses hidden_size / heads = "
                         f"{hf_vision.hidden_size // hf_vision.num_attention_heads}; fix the checkpoint's vision_config.")
    return PixtralVisionConfig(
        family="pixtral", d_model=hf_vision.hidden_size, n_heads=hf_vision.num_attention_heads,
        d_mlp=hf_vision.intermediate_size, n_layers=hf_vision.num_hidden_layers, image_size=None,
        patch_size=_int_setting(hf_vision.patch_size, "patch_size"), eps=PIXTRAL_EPS, act_fn=hf_vision.hidden_act,
        n_channels=hf_vision.num_channels, has_class_token=False, rotary_base=float(rope.get("rope_theta", 10000.0)),
        max_image_size=_int_setting(hf_vision.image_size, "image_size"),
    )


def mistral3_configs(hf_config: Any, dtype: torch.dtype, device: str
                     ) -> tuple[HookedTransformerConfig, Mistral3Config]:
    vision = pixtral_vision_config(hf_config.vision_config)
    text = hf_config.text_config
    vlm_cfg = Mistral3Config(
        architecture="Mistral3ForConditionalGeneration", vision=vision,
        image_token_id=hf_config.image_token_id,
        feature_layers=normalise_feature_layers(hf_config.vision_feature_layer, vision.n_layers),
        spatial_merge_size=hf_config.spatial_merge_size, projector_act=hf_config.projector_hidden_act,
        projector_bias=hf_config.multimodal_projector_bias, projector_eps=text.rms_norm_eps,
    )
    return text_config_to_tl(text, dtype, device), vlm_cfg
