"""Gemma 3's settings (pooled image tokens, the marker tokens) and how to read them, with the language
model's ``HookedTransformerConfig``, from an HF ``Gemma3Config``.

The language model's config mirrors what TransformerLens 3.9 writes for ``google/gemma-3-*``
(``loading_from_pretrained``): grouped-query attention with RMS-normed queries and keys, norms before and
after attention and MLP, local (sliding-window) and global layers with their own rotary bases, linear rotary
scaling on the global layers, embeddings scaled by sqrt(d_model) (inside TransformerLens's converter) and the
attention scale 1/sqrt(query_pre_attn_scalar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.config import VLMConfig
from vlm_lens.vision.convert import siglip_vision_config

LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}


@dataclass(frozen=True)
class Gemma3Config(VLMConfig):
    """Each image is one SigLIP tile whose patch grid is average-pooled to ``mm_tokens_per_image`` tokens."""

    mm_tokens_per_image: int
    boi_token_id: int | None = None  # <start_of_image>, just before an image's tokens
    eoi_token_id: int | None = None  # <end_of_image>, just after

    def __post_init__(self) -> None:
        super().__post_init__()
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image or side == 0:
            raise ValueError(f"mm_tokens_per_image={self.mm_tokens_per_image} is not a square number; Gemma 3 pools "
                             "each image to a square grid of tokens.")
        if self.vision.grid_size % side:
            raise ValueError(f"the tower's {self.vision.grid_size}x{self.vision.grid_size} patch grid cannot be pooled "
                             f"to {side}x{side} tokens (mm_tokens_per_image={self.mm_tokens_per_image}); fix the checkpoint.")
        if self.feature_layers != (self.vision.n_layers,):
            raise ValueError(f"feature_layers={self.feature_layers}: Gemma 3 reads the tower's last layer "
                             f"({self.vision.n_layers}) only.")

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool_size(self) -> int:
        """Side of the square of patches averaged into one token."""
        return self.vision.grid_size // self.tokens_per_side


def _rope(text: Any) -> dict[str, Any]:
    """Rotary bases of the global and local layers, and the global layers' linear scaling."""
    params = text.rope_parameters
    full, local = params["full_attention"], params["sliding_attention"]
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters['sliding_attention'] has rope_type {local.get('rope_type')!r}; vlm_lens "
                         "supports 'default' for the local layers (as every Gemma 3 checkpoint has).")
    full_type = full.get("rope_type", "default")
    if full_type not in ("default", "linear"):
        raise ValueError(f"rope_parameters['full_attention'] has rope_type {full_type!r}; vlm_lens supports 'default' "
                         "and 'linear' for the global layers.")
    factor = float(full.get("factor", 1.0)) if full_type == "linear" else 1.0
    return dict(rotary_base=full["rope_theta"], rotary_base_local=local["rope_theta"], rotary_scaling_factor=factor)


def _check_text(text: Any, image_token_id: int) -> None:
    if getattr(text, "model_type", None) != "gemma3_text":
        raise ValueError(f"Gemma 3's text_config has model_type {getattr(text, 'model_type', None)!r}; expected "
                         "'gemma3_text'.")
    unsupported = {
        "use_bidirectional_attention": bool(getattr(text, "use_bidirectional_attention", False)),
        "attn_logit_softcapping": getattr(text, "attn_logit_softcapping", None) is not None,
        "attention_bias": bool(getattr(text, "attention_bias", False)),
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"text_config sets {', '.join(bad)}, which vlm_lens's Gemma 3 does not support (no Gemma 3 "
                         "vision-language checkpoint does); use a checkpoint without them.")
    if text.sliding_window is None or any(t not in LAYER_TYPES for t in text.layer_types):
        raise ValueError(f"text_config.layer_types={text.layer_types} with sliding_window={text.sliding_window}: "
                         f"each layer must be one of {sorted(LAYER_TYPES)}, with a sliding window set.")
    if image_token_id >= text.vocab_size:
        raise ValueError(f"image_token_id={image_token_id} is outside the text vocabulary ({text.vocab_size}); "
                         "vlm_lens needs the image token to have an embedding row (every Gemma 3 checkpoint has).")


def gemma3_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, Gemma3Config]:
    text = hf_config.text_config
    _check_text(text, hf_config.image_token_id)
    vision = siglip_vision_config(hf_config.vision_config)
    cfg = HookedTransformerConfig(
        d_model=text.hidden_size, d_head=text.head_dim, n_heads=text.num_attention_heads,
        n_key_value_heads=text.num_key_value_heads,  # TL's Gemma converter always writes grouped K/V
        d_mlp=text.intermediate_size, n_layers=text.num_hidden_layers, n_ctx=text.max_position_embeddings,
        d_vocab=text.vocab_size, act_fn=text.hidden_activation, eps=text.rms_norm_eps,
        normalization_type="RMS", final_rms=True, gated_mlp=True,
        use_normalization_before_and_after=True, use_qk_norm=True,
        positional_embedding_type="rotary", rotary_dim=text.head_dim, rotary_adjacent_pairs=False,
        use_attn_scale=True, attn_scale=math.sqrt(text.query_pre_attn_scalar),
        use_local_attn=True, window_size=text.sliding_window,
        attn_types=[LAYER_TYPES[t] for t in text.layer_types],
        # Gemma3ForConditionalGeneration never soft-caps its logits (only the text-only Gemma3ForCausalLM does).
        original_architecture="Gemma3ForConditionalGeneration", default_prepend_bos=True,
        dtype=dtype, device=str(device), init_weights=False, **_rope(text),
    )
    vlm_cfg = Gemma3Config(
        architecture="Gemma3ForConditionalGeneration", vision=vision, feature_layers=(vision.n_layers,),
        image_token_id=hf_config.image_token_id, mm_tokens_per_image=hf_config.mm_tokens_per_image,
        boi_token_id=getattr(hf_config, "boi_token_id", None), eoi_token_id=getattr(hf_config, "eoi_token_id", None),
    )
    return cfg, vlm_cfg
