"""Language models: HF ``text_config`` -> ``HookedTransformerConfig``, and weights through
TransformerLens's own converters (Llama, Mistral, Qwen2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_llama_weights,
    convert_mistral_weights,
    convert_qwen2_weights,
)

from vlm_lens._tl.weights import convert_with_tl
from vlm_lens.architectures.checks import require_exact_keys


@dataclass(frozen=True)
class LanguageFamily:
    original_architecture: str
    convert: Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]
    qkv_bias: bool
    default_prepend_bos: bool
    # TL's Mistral/Qwen2 converters always emit grouped-query keys (``_W_K``); Llama's follows the config.
    always_grouped: bool = True


LANGUAGE_FAMILIES: dict[str, LanguageFamily] = {
    "llama": LanguageFamily(
        "LlamaForCausalLM", convert_llama_weights, qkv_bias=False, default_prepend_bos=True, always_grouped=False
    ),
    "mistral": LanguageFamily(
        "MistralForCausalLM", convert_mistral_weights, qkv_bias=False, default_prepend_bos=True
    ),
    "qwen2": LanguageFamily("Qwen2ForCausalLM", convert_qwen2_weights, qkv_bias=True, default_prepend_bos=False),
}


def language_family(text_config: Any) -> LanguageFamily:
    model_type = getattr(text_config, "model_type", None)
    if model_type not in LANGUAGE_FAMILIES:
        raise ValueError(
            f"Unsupported language model type {model_type!r}; vlm_lens converts: "
            f"{', '.join(sorted(LANGUAGE_FAMILIES))}."
        )
    return LANGUAGE_FAMILIES[model_type]


def _rope(text_config: Any) -> dict[str, Any]:
    """Rotary settings from either the v5 ``rope_parameters`` dict or the older top-level fields."""
    params = dict(getattr(text_config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    if theta is None:
        raise ValueError("The text config has no rope_theta; cannot build rotary embeddings.")
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": theta}
    if rope_type == "llama3":
        out.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=params.get("original_max_position_embeddings", 8192),
            NTK_by_parts_low_freq_factor=params.get("low_freq_factor", 1.0),
            NTK_by_parts_high_freq_factor=params.get("high_freq_factor", 4.0),
            NTK_by_parts_factor=params.get("factor", 8.0),
        )
    elif rope_type != "default":
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by vlm_lens yet (supported: 'default', 'llama3')."
        )
    return out


def _sliding_window(text_config: Any) -> dict[str, Any]:
    """TransformerLens's local-attention settings for a sliding window (Mistral; Qwen2 with
    ``use_sliding_window``), per layer as HF's ``layer_types`` says (Qwen2: the layers from
    ``max_window_layers`` on), or {} without one. TransformerLens reads ``attn_types`` only with
    ``use_local_attn``."""
    sliding = getattr(text_config, "sliding_window", None)
    if text_config.model_type == "qwen2" and not getattr(text_config, "use_sliding_window", False):
        return {}
    if sliding is None or sliding >= text_config.max_position_embeddings:
        return {}
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        types = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    else:
        types = ["local"] * text_config.num_hidden_layers
    return {"use_local_attn": True, "window_size": sliding, "attn_types": types} if "local" in types else {}


def text_config_to_tl(
    text_config: Any, dtype: torch.dtype, device: str | torch.device
) -> HookedTransformerConfig:
    """Translate an HF Llama/Mistral/Qwen2 config object into a ``HookedTransformerConfig``."""
    family = language_family(text_config)
    n_heads = text_config.num_attention_heads
    d_head = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_heads
    act = text_config.hidden_act
    n_kv = text_config.num_key_value_heads
    if n_kv == n_heads and not family.always_grouped:
        n_kv = None  # plain multi-head attention: TL then offers hook_attn_in too
    local = _sliding_window(text_config)
    return HookedTransformerConfig(
        d_model=text_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv,
        d_mlp=text_config.intermediate_size,
        n_layers=text_config.num_hidden_layers,
        n_ctx=text_config.max_position_embeddings,
        d_vocab=text_config.vocab_size,
        act_fn=act,
        eps=text_config.rms_norm_eps,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        original_architecture=family.original_architecture,
        default_prepend_bos=family.default_prepend_bos,
        dtype=dtype,
        device=str(device),
        init_weights=False,
        **_rope(text_config),
        **local,
    )


def _expected_hf_lm_params(text_config: Any, qkv_bias: bool) -> set[str]:
    keys = {"embed_tokens.weight", "norm.weight"}
    for i in range(text_config.num_hidden_layers):
        p = f"layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        keys |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if qkv_bias:
            keys |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
    return keys


def convert_language_model(
    hf_lm: torch.nn.Module, lm_head: torch.nn.Module, text_config: Any, cfg: HookedTransformerConfig
) -> dict[str, torch.Tensor]:
    """TransformerLens state dict of the language model (reusing TL's converter for the family)."""
    family = language_family(text_config)
    require_exact_keys(
        (name for name, _ in hf_lm.named_parameters()),
        _expected_hf_lm_params(text_config, family.qkv_bias),
        f"{family.original_architecture} language model",
        hint="Weights the converter does not know would be silently ignored, so loading stops here.",
    )
    return convert_with_tl(family.convert, hf_lm, lm_head, cfg)
