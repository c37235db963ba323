"""Qwen3-VL weights: the language model through TransformerLens's ``convert_qwen3_weights``; the vision tower,
the projector and the deepstack mergers converted here."""

from __future__ import annotations

from typing import Any

import einops
import torch
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_qwen3_weights

from vlm_lens._tl.weights import convert_with_tl
from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.qwen3_vl.config import Qwen3VLConfig

_TOP_LEVEL = ("model.language_model.", "model.visual.", "lm_head.")
_LINEAR = ("weight", "bias")


def convert_merger(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """A ``Qwen3VLVisionPatchMerger`` (``norm``, ``linear_fc1``, GELU, ``linear_fc2``) -> ``Qwen3PatchMerger``."""
    return {f"{dst}ln_q.w": sd[f"{src}norm.weight"], f"{dst}ln_q.b": sd[f"{src}norm.bias"],
            f"{dst}W_in": sd[f"{src}linear_fc1.weight"].T, f"{dst}b_in": sd[f"{src}linear_fc1.bias"],
            f"{dst}W_out": sd[f"{src}linear_fc2.weight"].T, f"{dst}b_out": sd[f"{src}linear_fc2.bias"]}


def convert_qwen3_vision(visual: torch.nn.Module, cfg: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """``vision.*``, ``projector.*`` and ``deepstack.*`` weights from an HF ``Qwen3VLVisionModel``."""
    sd = dict(visual.named_parameters())
    vcfg = cfg.vision
    require_exact_keys(sd.keys(), _expected_vision_params(vcfg.n_layers, cfg.n_deepstack), "Qwen3-VL vision tower")
    n = vcfg.n_heads
    out = {"vision.W_patch": sd["patch_embed.proj.weight"], "vision.b_patch": sd["patch_embed.proj.bias"],
           "vision.W_pos": sd["pos_embed.weight"], **convert_merger(sd, "merger.", "projector.")}
    for k in range(cfg.n_deepstack):
        out.update(convert_merger(sd, f"deepstack_merger_list.{k}.", f"deepstack.{k}."))
    for i in range(vcfg.n_layers):
        src, dst = f"blocks.{i}.", f"vision.blocks.{i}."
        weights, biases = sd[src + "attn.qkv.weight"].chunk(3), sd[src + "attn.qkv.bias"].chunk(3)
        for name, w, b in zip("QKV", weights, biases):
            out[f"{dst}attn.W_{name}"] = einops.rearrange(w, "(n h) m -> n m h", n=n)
            out[f"{dst}attn.b_{name}"] = einops.rearrange(b, "(n h) -> n h", n=n)
        out[dst + "attn.W_O"] = einops.rearrange(sd[src + "attn.proj.weight"], "m (n h) -> n h m", n=n)
        out[dst + "attn.b_O"] = sd[src + "attn.proj.bias"]
        for hf, tl in (("norm1", "ln1"), ("norm2", "ln2")):
            out[f"{dst}{tl}.w"], out[f"{dst}{tl}.b"] = sd[f"{src}{hf}.weight"], sd[f"{src}{hf}.bias"]
        for hf, tl in (("linear_fc1", "in"), ("linear_fc2", "out")):
            out[f"{dst}mlp.W_{tl}"] = sd[f"{src}mlp.{hf}.weight"].T
            out[f"{dst}mlp.b_{tl}"] = sd[f"{src}mlp.{hf}.bias"]
    return out


def _expected_vision_params(n_layers: int, n_deepstack: int) -> set[str]:
    mergers = ["merger."] + [f"deepstack_merger_list.{k}." for k in range(n_deepstack)]
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight"}
    keys |= {f"{p}{m}.{w}" for p in mergers for m in ("norm", "linear_fc1", "linear_fc2") for w in _LINEAR}
    for i in range(n_layers):
        p = f"blocks.{i}."
        keys |= {f"{p}{m}.{w}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1",
                                          "mlp.linear_fc2") for w in _LINEAR}
    return keys


def _expected_lm_params(n_layers: int) -> set[str]:
    keys = {"embed_tokens.weight", "norm.weight"}
    for i in range(n_layers):
        p = f"layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        keys |= {f"{p}self_attn.{x}.weight" for x in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        keys |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


def convert_qwen3_vl(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    require_known_prefixes(hf_model, _TOP_LEVEL)
    inner = hf_model.model
    lm = inner.language_model
    require_exact_keys((name for name, _ in lm.named_parameters()), _expected_lm_params(cfg.n_layers),
                       "Qwen3 language model",
                       hint="Weights the converter does not know would be silently ignored, so loading stops here.")
    state = convert_with_tl(convert_qwen3_weights, lm, hf_model.lm_head, cfg)
    state.update(convert_qwen3_vision(inner.visual, vlm_cfg))
    return state
