"""InternVL weights: the language model through TransformerLens's converters (Qwen2 or Llama), InternViT and the
projector here.

InternViT's layer scale is folded into the weights: ``lambda_1 * (z @ W_O + b_O)`` is stored as ``W_O * lambda_1``
and ``b_O * lambda_1`` (the same for ``lambda_2`` and the MLP's ``W_out``, ``b_out``), so TransformerLens's own
block adds exactly what HF's does. A tower without q/k/v biases (``attention_bias=False``) gets zero biases,
which is what it computes.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.internvl.config import InternVLConfig
from vlm_lens.architectures.language import convert_language_model

_TOP_LEVEL = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.")
_PROJECTOR = {f"{m}.{w}" for m in ("layer_norm", "linear_1", "linear_2") for w in ("weight", "bias")}


def _expected_vision_params(cfg: InternVLConfig, attention_bias: bool) -> set[str]:
    vcfg = cfg.vision
    keys = {"embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias"}
    if vcfg.has_final_norm:
        keys |= {"layernorm.weight", "layernorm.bias"}
    norms = ("weight", "bias") if vcfg.norm_type == "layer_norm" else ("weight",)
    for i in range(vcfg.n_layers):
        p = f"encoder.layer.{i}."
        keys |= {p + "lambda_1", p + "lambda_2"}
        keys |= {f"{p}attention.{x}_proj.weight" for x in "qkv"}
        keys |= {f"{p}attention.projection_layer.{w}" for w in ("weight", "bias")}
        keys |= {f"{p}mlp.{m}.{w}" for m in ("fc1", "fc2") for w in ("weight", "bias")}
        keys |= {f"{p}{m}.{w}" for m in ("layernorm_before", "layernorm_after") for w in norms}
        if attention_bias:
            keys |= {f"{p}attention.{x}_proj.bias" for x in "qkv"}
        if vcfg.qk_norm:
            keys |= {f"{p}attention.{x}_norm.weight" for x in "qk"}
    return keys


def _block(sd: dict[str, torch.Tensor], i: int, n_heads: int) -> dict[str, torch.Tensor]:
    src, dst = f"encoder.layer.{i}.", f"vision.blocks.{i}."
    lambda_1, lambda_2 = sd[src + "lambda_1"], sd[src + "lambda_2"]
    out = {}
    for hf, tl in (("q", "Q"), ("k", "K"), ("v", "V")):
        weight = sd[f"{src}attention.{hf}_proj.weight"]
        bias = sd.get(f"{src}attention.{hf}_proj.bias", torch.zeros(len(weight), dtype=weight.dtype))
        out[f"{dst}attn.W_{tl}"] = einops.rearrange(weight, "(n h) m -> n m h", n=n_heads)
        out[f"{dst}attn.b_{tl}"] = einops.rearrange(bias, "(n h) -> n h", n=n_heads)
    w_o = sd[src + "attention.projection_layer.weight"] * lambda_1[:, None]
    out[dst + "attn.W_O"] = einops.rearrange(w_o, "m (n h) -> n h m", n=n_heads)
    out[dst + "attn.b_O"] = sd[src + "attention.projection_layer.bias"] * lambda_1
    out[dst + "mlp.W_in"], out[dst + "mlp.b_in"] = sd[src + "mlp.fc1.weight"].T, sd[src + "mlp.fc1.bias"]
    out[dst + "mlp.W_out"] = (sd[src + "mlp.fc2.weight"] * lambda_2[:, None]).T
    out[dst + "mlp.b_out"] = sd[src + "mlp.fc2.bias"] * lambda_2
    for x in "qk":
        if f"{src}attention.{x}_norm.weight" in sd:
            out[f"{dst}attn.{x}_norm.w"] = sd[f"{src}attention.{x}_norm.weight"]
    for hf, tl in (("layernorm_before", "ln1"), ("layernorm_after", "ln2")):
        out[f"{dst}{tl}.w"] = sd[f"{src}{hf}.weight"]
        if f"{src}{hf}.bias" in sd:
            out[f"{dst}{tl}.b"] = sd[f"{src}{hf}.bias"]
    return out


def convert_internvit(vision_tower: torch.nn.Module, cfg: InternVLConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` weights from an HF ``InternVLVisionModel``; blocks after the layer the VLM reads, and a final
    norm it does not read, are checked for and left out."""
    sd = dict(vision_tower.named_parameters())
    attention_bias = bool(vision_tower.config.attention_bias)
    require_exact_keys(sd.keys(), _expected_vision_params(cfg, attention_bias), "InternViT vision tower")
    out = {"vision.W_patch": sd["embeddings.patch_embeddings.projection.weight"],
           "vision.b_patch": sd["embeddings.patch_embeddings.projection.bias"],
           "vision.class_embedding": sd["embeddings.cls_token"].reshape(-1),
           "vision.W_pos": sd["embeddings.position_embeddings"][0]}
    if cfg.final_norm:
        out["vision.ln_final.w"], out["vision.ln_final.b"] = sd["layernorm.weight"], sd["layernorm.bias"]
    for i in range(cfg.n_vision_layers_used):
        out.update(_block(sd, i, cfg.vision.n_heads))
    return out


def convert_projector(projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = dict(projector.named_parameters())
    require_exact_keys(sd.keys(), _PROJECTOR, "InternVL projector")
    return {"projector.ln.w": sd["layer_norm.weight"], "projector.ln.b": sd["layer_norm.bias"],
            "projector.W_in": sd["linear_1.weight"].T, "projector.b_in": sd["linear_1.bias"],
            "projector.W_out": sd["linear_2.weight"].T, "projector.b_out": sd["linear_2.bias"]}


def convert_internvl(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: InternVLConfig) -> dict[str, torch.Tensor]:
    require_known_prefixes(hf_model, _TOP_LEVEL)
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, hf_model.config.text_config, cfg)
    state.update(convert_internvit(inner.vision_tower, vlm_cfg))
    state.update(convert_projector(inner.multi_modal_projector))
    return state
