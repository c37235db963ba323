"""PaliGemma weights: the language model through TransformerLens's ``convert_gemma_weights`` (Gemma and
Gemma 2: embeddings scaled by sqrt(d_model), Gemma's ``1 + w`` norms, Gemma 2's post norms); the SigLIP tower
through the shared converter plus its final norm; the linear projector here."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

from vlm_lens._tl.weights import convert_with_tl
from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.paligemma.config import PaliGemmaConfig
from vlm_lens.vision.convert import convert_siglip_vision

TOP_LEVEL = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.")


def _expected_lm_params(n_layers: int, post_norms: bool) -> set[str]:
    norms = ["input_layernorm", "post_attention_layernorm"]
    if post_norms:  # Gemma 2
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    keys = {"embed_tokens.weight", "norm.weight"}
    for i in range(n_layers):
        p = f"layers.{i}."
        keys |= {f"{p}{norm}.weight" for norm in norms}
        keys |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


def convert_language_model(hf_lm: torch.nn.Module, lm_head: torch.nn.Module, cfg: HookedTransformerConfig
                           ) -> dict[str, torch.Tensor]:
    expected = _expected_lm_params(cfg.n_layers, cfg.use_normalization_before_and_after)
    require_exact_keys((name for name, _ in hf_lm.named_parameters()), expected,
                       f"PaliGemma language model ({cfg.original_architecture})",
                       hint="Weights the converter does not know would be silently ignored, so loading stops here.")
    return convert_with_tl(convert_gemma_weights, hf_lm, lm_head, cfg)


def convert_projector(projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = dict(projector.named_parameters())
    require_exact_keys(sd.keys(), {"linear.weight", "linear.bias"}, "PaliGemma projector")
    return {"projector.W": sd["linear.weight"].T, "projector.b": sd["linear.bias"]}


def convert_paligemma(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: PaliGemmaConfig
                      ) -> dict[str, torch.Tensor]:
    """LM, tower (with its final norm) and projector; any weight outside ``TOP_LEVEL`` is an error."""
    require_known_prefixes(hf_model, TOP_LEVEL)
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, cfg)
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    state.update(convert_siglip_vision(tower, vlm_cfg))
    state["vision.ln_final.w"] = tower.post_layernorm.weight
    state["vision.ln_final.b"] = tower.post_layernorm.bias
    state.update(convert_projector(inner.multi_modal_projector))
    return state
