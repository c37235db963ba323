"""Small, validated configs for the parts of a VLM that TransformerLens does not describe.

The language model keeps TransformerLens's own ``HookedTransformerConfig``; these configs cover the
vision tower, the feature selection and the projector. No training or logging fields live here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

VisionFamily = Literal["clip", "siglip", "qwen2_5_vl"]
SelectStrategy = Literal["default", "full"]


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a ViT-style vision tower as stored in the checkpoint.

    ``image_size=None`` means dynamic resolution (Qwen2.5-VL): each image brings its own patch grid
    (``image_grid_thw``), and the fields after ``has_class_token`` describe that tower.
    """

    family: VisionFamily
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
    temporal_patch_size: int = 1  # frames per patch (Qwen2.5-VL repeats a still image twice)
    spatial_merge_size: int = 1  # side of the patch block the projector merges into one token
    window_size: int | None = None  # side of an attention window in pixels; None: every block is global
    full_attention_layers: tuple[int, ...] = ()  # blocks that attend over the whole image despite window_size
    rotary_base: float | None = None  # theta of a 2-D rotary embedding (None: learned positions)

    def __post_init__(self) -> None:
        if self.family not in ("clip", "siglip", "qwen2_5_vl"):
            raise ValueError(
                f"Unknown vision family {self.family!r}; supported: 'clip', 'siglip', 'qwen2_5_vl'."
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"vision d_model={self.d_model} is not divisible by n_heads={self.n_heads}.")
        # A remainder is allowed: the patch convolution skips it (SigLIP-so400m: 384 px tiles, 14 px patches).
        if self.image_size is not None and self.image_size < self.patch_size:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}.")
        self._check_windows()

    def _check_windows(self) -> None:
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
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def window_tokens(self) -> int | None:
        """Side of an attention window in merged tokens (Qwen2.5-VL), or None without windows."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        if self.image_size is None:
            raise ValueError(
                f"The {self.family} tower takes images of any size: each image's patch grid comes with it "
                "(image_grid_thw), not from the config. Read it from inputs.layout.grid(i) instead."
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
    mrope_section: tuple[int, ...] = ()  # Qwen2.5-VL: rotary frequencies given to (time, row, column) positions
    vision_start_token_id: int | None = None  # Qwen2.5-VL: the tokens around each image's tokens
    vision_end_token_id: int | None = None

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
        if self.select_strategy == "default" and not self.vision.has_class_token:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the class token, but the {self.vision.family} "
                "tower has none (it would drop a patch); set vision_feature_select_strategy='full'."
            )
        self._check_any_resolution()

    def _check_any_resolution(self) -> None:
        tile = self.vision.image_size
        for pinpoint in self.image_grid_pinpoints:
            if len(pinpoint) != 2 or any(side <= 0 or side % tile for side in pinpoint):
                raise ValueError(
                    f"image_grid_pinpoints entry {list(pinpoint)} is not a (height, width) pair of multiples of the "
                    f"vision tile size {tile}; fix image_grid_pinpoints in the checkpoint's config."
                )
        if self.image_grid_pinpoints and self.n_image_tokens != self.vision.n_patches:
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
