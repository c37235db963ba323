"""The configs every family shares. The language model keeps TransformerLens's ``HookedTransformerConfig``.

``VisionConfig`` is the shape of a ViT-style vision tower; ``VLMConfig`` says which architecture the model
is, where its image tokens are and which vision layers it reads. A family adds its own settings by
subclassing either (``architectures/<family>/config.py``); nothing here names a family. No training or
logging fields live in a model config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a ViT-style vision tower as stored in the checkpoint.

    ``family`` names the tower (e.g. ``"clip"``); ``image_size=None`` means dynamic resolution: each image
    brings its own patch grid, read from the inputs, not from the config.
    """

    family: str
    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int  # layers in the checkpoint (not all need to be built)
    image_size: int | None
    patch_size: int
    eps: float
    act_fn: str
    n_channels: int = 3
    has_class_token: bool = True

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "d_mlp", "patch_size", "n_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vision {name}={getattr(self, name)} must be positive.")
        if self.n_layers < 0:
            raise ValueError(f"vision n_layers={self.n_layers} must be >= 0.")
        if self.d_model % self.n_heads:
            raise ValueError(f"vision d_model={self.d_model} is not divisible by n_heads={self.n_heads}.")
        # A remainder is allowed: the patch convolution skips it (SigLIP-so400m: 384 px tiles, 14 px patches).
        if self.image_size is not None and self.image_size < self.patch_size:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}.")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        if self.image_size is None:
            raise ValueError(
                f"The {self.family} tower takes images of any size: each image's patch grid comes with it, "
                "not from the config. Read it from inputs.layout.grid(i) instead."
            )
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    @property
    def n_positions(self) -> int:
        return self.n_patches + int(self.has_class_token)


@dataclass(frozen=True)
class VLMConfig:
    """What every family has: its HF architecture name (the registry key), its vision tower, the id of
    the image placeholder token and the vision layers whose hidden states it reads."""

    architecture: str
    vision: VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...]  # hidden-state indices, 0 = the blocks' input, k = after block k-1

    def __post_init__(self) -> None:
        if not self.feature_layers:
            raise ValueError("feature_layers is empty; give at least one vision layer index.")
        for layer in self.feature_layers:
            if not 0 <= layer <= self.vision.n_layers:
                raise ValueError(
                    f"vision feature layer {layer} is out of range for a tower of "
                    f"{self.vision.n_layers} layers (valid hidden-state indices: 0..{self.vision.n_layers})."
                )
        if self.image_token_id < 0:
            raise ValueError(f"image_token_id={self.image_token_id} must be a token id (>= 0).")

    @property
    def n_vision_layers_used(self) -> int:
        """Blocks that must run: layers after the deepest selected one are never computed."""
        return max(self.feature_layers)

    @property
    def d_image_features(self) -> int:
        return self.vision.d_model * len(self.feature_layers)


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
