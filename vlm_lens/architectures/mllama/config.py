"""Mllama's settings and how to read them from an HF ``MllamaConfig``.

The vision tower is a ViT over up to ``max_tiles`` tiles per image (a local and a gated global transformer,
aspect-ratio embeddings, intermediate-layer features); the language model is Llama with gated
cross-attention decoder layers at ``cross_attention_layers``. TransformerLens's block list keeps HF's layer
numbering: block ``l`` is a cross-attention block if ``l`` is in ``cross_attention_layers``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.language import text_config_to_tl
from vlm_lens.config import VisionConfig, VLMConfig

ARCHITECTURE = "MllamaForConditionalGeneration"


@dataclass(frozen=True)
class MllamaVisionConfig(VisionConfig):
    """Tiles of ``image_size`` px; ``n_layers`` local blocks then ``n_global_layers`` gated global blocks."""

    n_global_layers: int = 8
    max_tiles: int = 4
    intermediate_layers: tuple[int, ...] = ()  # local blocks whose outputs join the features
    aspect_ratios: tuple[tuple[int, int], ...] = ()  # (tile rows, tile cols) of aspect-ratio id 1, 2, ...
    vision_output_dim: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is None or self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size} "
                             "(Mllama tiles are square grids of patches).")
        bad = [i for i in self.intermediate_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"intermediate_layers_indices {bad} are out of range for {self.n_layers} local blocks.")
        expected = self.d_model * (1 + len(self.intermediate_layers))
        if self.vision_output_dim != expected:
            raise ValueError(f"vision_output_dim={self.vision_output_dim}, but the tower outputs hidden_size * "
                             f"(1 + len(intermediate_layers_indices)) = {expected} features; fix the checkpoint's "
                             "vision_config.")
        if any(r * c > self.max_tiles for r, c in self.aspect_ratios):
            raise ValueError(f"supported_aspect_ratios {self.aspect_ratios} need more than max_num_tiles="
                             f"{self.max_tiles} tiles.")

    @property
    def n_tile_positions(self) -> int:
        """Positions per tile: the class token and the patches."""
        return self.n_patches + 1


@dataclass(frozen=True)
class MllamaConfig(VLMConfig):
    """``cross_attention_layers``: the block indices (HF's layer numbering) that cross-attend to the image."""

    cross_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision, MllamaVisionConfig):
            raise ValueError(f"Mllama needs a MllamaVisionConfig, got {type(self.vision).__name__}.")

    @property
    def keys_per_image(self) -> int:
        """Cross-attention keys of one image: every tile slot (padding tiles too) times its positions."""
        return self.vision.max_tiles * self.vision.n_tile_positions


class _AsLlama:
    """An Mllama text config read as a Llama one (its self-attention layers have Llama's weights)."""

    model_type = "llama"

    def __init__(self, text_config: Any):
        self._config = text_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def mllama_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, MllamaConfig]:
    text, vision = hf_config.text_config, hf_config.vision_config
    cross = tuple(sorted(int(i) for i in text.cross_attention_layers))
    if not cross or cross[0] == 0 or cross[-1] >= text.num_hidden_layers:
        raise ValueError(f"cross_attention_layers={list(text.cross_attention_layers)} must be indices in 1.."
                         f"{text.num_hidden_layers - 1}: block 0 must be a self-attention layer (TransformerLens reads "
                         "the KV-cache length there). Fix the checkpoint's text_config.")
    cfg = text_config_to_tl(_AsLlama(text), dtype, device)
    if cfg.d_head != text.hidden_size // text.num_attention_heads:
        raise ValueError(f"head_dim={cfg.d_head} differs from hidden_size / heads; Mllama's attention uses the latter.")
    # The embedding has 8 rows more than the vocabulary (<|image|> is one of them); the unembedding has not.
    cfg = dataclasses.replace(cfg, d_vocab=text.vocab_size + 8, d_vocab_out=text.vocab_size)
    image_size, patch_size = vision.image_size, vision.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(f"image_size={image_size!r}, patch_size={patch_size!r}: vlm_lens supports square tiles and "
                         "patches only (ints).")
    vcfg = MllamaVisionConfig(
        family="mllama", d_model=vision.hidden_size, n_heads=vision.attention_heads, d_mlp=vision.intermediate_size,
        n_layers=vision.num_hidden_layers, image_size=image_size, patch_size=patch_size, eps=vision.norm_eps,
        act_fn=vision.hidden_act, n_channels=vision.num_channels, has_class_token=True,
        n_global_layers=vision.num_global_layers, max_tiles=vision.max_num_tiles,
        intermediate_layers=tuple(int(i) for i in vision.intermediate_layers_indices),
        aspect_ratios=tuple((int(r), int(c)) for r, c in vision.supported_aspect_ratios),
        vision_output_dim=vision.vision_output_dim,
    )
    vlm_cfg = MllamaConfig(architecture=ARCHITECTURE, vision=vcfg, image_token_id=hf_config.image_token_index,
                           feature_layers=(vcfg.n_layers,), cross_attention_layers=cross)
    return cfg, vlm_cfg
