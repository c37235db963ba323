"""PaliGemma's settings and how to read them, with the language model's ``HookedTransformerConfig``, from an
HF ``PaliGemmaConfig``.

The language model's config mirrors what TransformerLens 3.9 writes for ``google/gemma-2b`` (PaliGemma) and
``google/gemma-2-*`` (PaliGemma 2) in ``loading_from_pretrained``: grouped-query attention, RMS norms (Gemma's
``1 + w`` added inside TransformerLens's converter), gated MLP, rotary, embeddings scaled by sqrt(d_model)
(also inside the converter). Gemma 2 adds norms after attention and MLP, local (sliding-window) and global
layers as HF's ``layer_types`` say, soft-capped attention scores and final logits, and the attention scale
1/sqrt(query_pre_attn_scalar). Values are read from the checkpoint's ``text_config``, not from TransformerLens's
table, so every size works.
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
TEXT_MODELS = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


@dataclass(frozen=True)
class PaliGemmaConfig(VLMConfig):
    """Each image is one SigLIP tile; every patch is one image token (no pooling, no class token)."""

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_patches

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_layers != (self.vision.n_layers,):
            raise ValueError(f"feature_layers={self.feature_layers}: PaliGemma reads the tower's last layer "
                             f"({self.vision.n_layers}) after its final norm, only.")


def _rope_base(text: Any) -> float:
    params = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"text_config.rope_parameters has rope_type {rope_type!r}; vlm_lens's PaliGemma supports "
                         "'default' (as every PaliGemma checkpoint has).")
    return float(params.get("rope_theta", getattr(text, "rope_theta", 10000.0)))


def _check_text(text: Any, image_token_id: int) -> None:
    model_type = getattr(text, "model_type", None)
    if model_type not in TEXT_MODELS:
        raise ValueError(f"PaliGemma's text_config has model_type {model_type!r}; vlm_lens supports "
                         f"{sorted(TEXT_MODELS)} (PaliGemma and PaliGemma 2).")
    if getattr(text, "attention_bias", False):
        raise ValueError("text_config sets attention_bias, which no PaliGemma checkpoint has and TransformerLens's "
                         "Gemma converter drops; use a checkpoint without it.")
    if model_type == "gemma2" and any(t not in LAYER_TYPES for t in text.layer_types):
        raise ValueError(f"text_config.layer_types={text.layer_types}: each layer must be one of {sorted(LAYER_TYPES)}.")
    if image_token_id >= text.vocab_size:
        raise ValueError(f"image_token_id={image_token_id} is outside the text vocabulary ({text.vocab_size}); "
                         "vlm_lens needs the image token to have an embedding row (every PaliGemma checkpoint has).")


def _gemma2_fields(text: Any) -> dict[str, Any]:
    """What Gemma 2 adds to Gemma in TransformerLens's config."""
    attn_cap = getattr(text, "attn_logit_softcapping", None)
    logit_cap = getattr(text, "final_logit_softcapping", None)
    out: dict[str, Any] = dict(
        use_normalization_before_and_after=True,
        attn_scale=math.sqrt(text.query_pre_attn_scalar),
        attn_scores_soft_cap=float(attn_cap) if attn_cap is not None else -1.0,
        output_logits_soft_cap=float(logit_cap) if logit_cap is not None else -1.0,
    )
    if text.sliding_window is not None:
        out.update(use_local_attn=True, window_size=text.sliding_window,
                   attn_types=[LAYER_TYPES[t] for t in text.layer_types])
    return out


def language_config(text: Any, dtype: torch.dtype, device: str) -> HookedTransformerConfig:
    act = getattr(text, "hidden_activation", None) or text.hidden_act  # Gemma 2 names it hidden_activation
    extra = _gemma2_fields(text) if text.model_type == "gemma2" else {}
    return HookedTransformerConfig(
        d_model=text.hidden_size, d_head=text.head_dim, n_heads=text.num_attention_heads,
        n_key_value_heads=text.num_key_value_heads,  # TL's Gemma converter always writes grouped K/V
        d_mlp=text.intermediate_size, n_layers=text.num_hidden_layers, n_ctx=text.max_position_embeddings,
        d_vocab=text.vocab_size, act_fn=act, eps=text.rms_norm_eps, normalization_type="RMS", final_rms=True,
        gated_mlp=True, positional_embedding_type="rotary", rotary_dim=text.head_dim, rotary_adjacent_pairs=False,
        rotary_base=_rope_base(text), use_attn_scale=True, original_architecture=TEXT_MODELS[text.model_type],
        default_prepend_bos=False,  # the processor puts <bos> after the image tokens
        dtype=dtype, device=str(device), init_weights=False, **extra,
    )


def paligemma_configs(hf_config: Any, dtype: torch.dtype, device: str
                      ) -> tuple[HookedTransformerConfig, PaliGemmaConfig]:
    text = hf_config.text_config
    _check_text(text, hf_config.image_token_id)
    vision = siglip_vision_config(hf_config.vision_config)
    if hf_config.vision_config.projection_dim != text.hidden_size:
        raise ValueError(f"projection_dim={hf_config.vision_config.projection_dim} differs from the language model's "
                         f"hidden_size={text.hidden_size}; the projector must write into the residual stream.")
    vlm_cfg = PaliGemmaConfig(architecture="PaliGemmaForConditionalGeneration", vision=vision,
                              feature_layers=(vision.n_layers,), image_token_id=hf_config.image_token_id)
    return language_config(text, dtype, device), vlm_cfg
