"""Small, validated configs for the parts of a VLM that TransformerLens does not describe.

The language model keeps TransformerLens's own ``HookedTransformerConfig``; these configs cover the
vision tower, the feature selection and the projector. No training or logging fields live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VisionFamily = Literal["clip"]
SelectStrategy = Literal["default", "full"]


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a ViT-style vision tower as stored in the checkpoint."""

    family: VisionFamily
    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int  # layers in the checkpoint (not all need to be built)
    image_size: int
    patch_size: int
    eps: float
    act_fn: str
    n_channels: int = 3
    has_class_token: bool = True

    def __post_init__(self) -> None:
        if self.family not in ("clip",):
            raise ValueError(f"Unknown vision family {self.family!r}; supported: 'clip'.")
        if self.d_model % self.n_heads:
            raise ValueError(f"vision d_model={self.d_model} is not divisible by n_heads={self.n_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}."
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    @property
    def n_positions(self) -> int:
        return self.n_patches + int(self.has_class_token)


@dataclass(frozen=True)
class VLMConfig:
    """How vision features are selected, projected and merged into the language model."""

    architecture: str
    vision: VisionConfig
    feature_layers: tuple[int, ...]  # hidden-state indices, 0 = after ln_pre, k = after block k-1
    select_strategy: SelectStrategy
    image_token_id: int
    projector_act: str
    projector_bias: bool
    pipeline: str = "llava"  # key of vlm_lens.image_pipeline.PIPELINES
    image_newline: bool = False  # LLaVA-NeXT/OneVision: a learned embedding ends each row of tokens
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # any-resolution tilings (height, width)
    vision_aspect_ratio: str | None = None  # LLaVA-OneVision, e.g. "anyres_max_9"

    def __post_init__(self) -> None:
        if not self.feature_layers:
            raise ValueError("feature_layers is empty; give at least one vision layer index.")
        for layer in self.feature_layers:
            if not 0 <= layer <= self.vision.n_layers:
                raise ValueError(
                    f"vision feature layer {layer} is out of range for a tower of "
                    f"{self.vision.n_layers} layers (valid hidden-state indices: 0..{self.vision.n_layers})."
                )
        if self.select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={self.select_strategy!r} is not supported; "
                "use 'default' (drop the class token) or 'full'."
            )

    @property
    def n_vision_layers_used(self) -> int:
        """Blocks that must run: layers after the deepest selected one are never computed."""
        return max(self.feature_layers)

    @property
    def d_image_features(self) -> int:
        return self.vision.d_model * len(self.feature_layers)

    @property
    def n_image_tokens(self) -> int:
        """Visual tokens one base tile contributes (one image, for LLaVA-1.5)."""
        drop_cls = self.select_strategy == "default" and self.vision.has_class_token
        return self.vision.n_positions - int(drop_cls)


def normalise_feature_layers(vision_feature_layer: int | list[int], n_layers: int) -> tuple[int, ...]:
    """Turn HF's ``vision_feature_layer`` (negative indices allowed) into hidden-state indices.

    HF indexes ``hidden_states`` of length ``n_layers + 1``; -1 is the last block's output.
    """
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    out = []
    for layer in layers:
        idx = layer + n_layers + 1 if layer < 0 else layer
        if not 0 <= idx <= n_layers:
            raise ValueError(
                f"vision_feature_layer {layer} is out of range for a vision tower of {n_layers} layers."
            )
        out.append(idx)
    return tuple(out)
