"""Mistral 3 weights: the language model through TransformerLens's Mistral (or Llama) converter; the Pixtral
tower (also LLaVA's, for Pixtral-12B) and the projector converted here."""

from __future__ import annotations

from typing import Any

import einops
import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.language import convert_language_model
from vlm_lens.architectures.pixtral.config import Mistral3Config, PixtralVLMConfig

TOP_LEVEL = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.")


def _pixtral_params(n_layers: int) -> set[str]:
    keys = {"patch_conv.weight", "ln_pre.weight"}
    for i in range(n_layers):
        p = f"transformer.layers.{i}."
        keys |= {p + "attention_norm.weight", p + "ffn_norm.weight"}
        keys |= {f"{p}attention.{x}_proj.weight" for x in "qkvo"}
        keys |= {f"{p}feed_forward.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


def convert_pixtral_vision(tower: torch.nn.Module, cfg: PixtralVLMConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` weights from an HF ``PixtralVisionModel``; blocks after the feature layer are left out on
    purpose (never computed), every other weight is consumed. Bias-free projections get TL's zero biases."""
    sd = dict(tower.named_parameters())
    vcfg = cfg.vision
    require_exact_keys(sd.keys(), _pixtral_params(vcfg.n_layers), "Pixtral vision tower")
    n, d = vcfg.n_heads, vcfg.d_model
    out = {"vision.W_patch": sd["patch_conv.weight"], "vision.ln_pre.w": sd["ln_pre.weight"]}
    for i in range(cfg.n_vision_layers_used):
        src, dst = f"transformer.layers.{i}.", f"vision.blocks.{i}."
        out[dst + "ln1.w"], out[dst + "ln2.w"] = sd[src + "attention_norm.weight"], sd[src + "ffn_norm.weight"]
        for x in "qkv":
            w = sd[f"{src}attention.{x}_proj.weight"]
            out[f"{dst}attn.W_{x.upper()}"] = einops.rearrange(w, "(n h) m -> n m h", n=n)
            out[f"{dst}attn.b_{x.upper()}"] = w.new_zeros(n, vcfg.d_head)
        out[dst + "attn.W_O"] = einops.rearrange(sd[src + "attention.o_proj.weight"], "m (n h) -> n h m", n=n)
        out[dst + "attn.b_O"] = sd[src + "attention.o_proj.weight"].new_zeros(d)
        for hf, tl in (("gate_proj", "gate"), ("up_proj", "in"), ("down_proj", "out")):
            out[f"{dst}mlp.W_{tl}"] = sd[f"{src}feed_forward.{hf}.weight"].T
        out[dst + "mlp.b_in"] = out[dst + "mlp.W_in"].new_zeros(vcfg.d_mlp)
        out[dst + "mlp.b_out"] = out[dst + "mlp.W_out"].new_zeros(d)
    return out


def convert_mistral3_projector(projector: torch.nn.Module, cfg: Mistral3Config) -> dict[str, torch.Tensor]:
    """``projector.*`` from an HF ``Mistral3MultiModalProjector``. The merger's input, unfolded by transformers
    as (d_vision, m1, m2), is reordered to the tower's (m1, m2, d_vision) rows."""
    sd = dict(projector.named_parameters())
    names = {"norm.weight", "patch_merger.merging_layer.weight", "linear_1.weight", "linear_2.weight"}
    if cfg.projector_bias:
        names |= {"linear_1.bias", "linear_2.bias"}
    require_exact_keys(sd.keys(), names, "Mistral 3 projector")
    m = cfg.spatial_merge_size
    merge = einops.rearrange(sd["patch_merger.merging_layer.weight"], "o (d m1 m2) -> (m1 m2 d) o", m1=m, m2=m)
    out = {"projector.norm.w": sd["norm.weight"], "projector.W_merge": merge,
           "projector.W_in": sd["linear_1.weight"].T, "projector.W_out": sd["linear_2.weight"].T}
    if cfg.projector_bias:
        out["projector.b_in"], out["projector.b_out"] = sd["linear_1.bias"], sd["linear_2.bias"]
    return out


def convert_mistral3(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: Mistral3Config) -> dict[str, torch.Tensor]:
    """LM, tower and projector; any weight outside ``TOP_LEVEL`` is an error (never silently dropped)."""
    require_known_prefixes(hf_model, TOP_LEVEL)
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, hf_model.config.text_config, cfg)
    state.update(convert_pixtral_vision(inner.vision_tower, vlm_cfg))
    state.update(convert_mistral3_projector(inner.multi_modal_projector, vlm_cfg))
    return state
