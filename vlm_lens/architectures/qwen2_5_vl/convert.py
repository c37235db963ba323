"""Qwen2.5-VL weights: the language model through TransformerLens's ``convert_qwen2_weights``; the vision
tower and the merger converted here. ``convert_qwen_vl`` and ``convert_qwen_shared_vision`` are the parts
Qwen2-VL shares (same top-level names, attention, patch embedding and merger MLP)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.language import convert_language_model
from vlm_lens.architectures.qwen2_5_vl.config import Qwen2_5_VLConfig, _AsQwen2

_TOP_LEVEL = ("model.language_model.", "model.visual.", "lm_head.")
VisionConverter = Callable[[torch.nn.Module, Qwen2_5_VLConfig], dict[str, torch.Tensor]]


def shared_vision_params(n_layers: int) -> set[str]:
    """HF names of the weights every Qwen tower has: patch embedding, attention, the merger's MLP and ln_q scale."""
    keys = {"patch_embed.proj.weight", "merger.ln_q.weight"}
    keys |= {f"merger.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for i in range(n_layers):
        keys |= {f"blocks.{i}.attn.{m}.{w}" for m in ("qkv", "proj") for w in ("weight", "bias")}
    return keys


def convert_qwen_shared_vision(sd: dict[str, torch.Tensor], cfg: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """The weights named in ``shared_vision_params``, as ``vision.*`` / ``projector.*`` parameters."""
    vcfg = cfg.vision
    n = vcfg.n_heads
    out = {"vision.W_patch": sd["patch_embed.proj.weight"], "projector.ln_q.w": sd["merger.ln_q.weight"],
           "projector.W_in": sd["merger.mlp.0.weight"].T, "projector.b_in": sd["merger.mlp.0.bias"],
           "projector.W_out": sd["merger.mlp.2.weight"].T, "projector.b_out": sd["merger.mlp.2.bias"]}
    for i in range(vcfg.n_layers):
        src, dst = f"blocks.{i}.", f"vision.blocks.{i}."
        weights, biases = sd[src + "attn.qkv.weight"].chunk(3), sd[src + "attn.qkv.bias"].chunk(3)
        for name, w, b in zip("QKV", weights, biases):
            out[f"{dst}attn.W_{name}"] = einops.rearrange(w, "(n h) m -> n m h", n=n)
            out[f"{dst}attn.b_{name}"] = einops.rearrange(b, "(n h) -> n h", n=n)
        out[dst + "attn.W_O"] = einops.rearrange(sd[src + "attn.proj.weight"], "m (n h) -> n h m", n=n)
        out[dst + "attn.b_O"] = sd[src + "attn.proj.bias"]
    return out


def convert_qwen_vision(visual: torch.nn.Module, cfg: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` and ``projector.*`` weights from an HF ``Qwen2_5_VisionTransformerPretrainedModel``."""
    sd = dict(visual.named_parameters())
    n_layers = cfg.vision.n_layers
    require_exact_keys(sd.keys(), _expected_vision_params(n_layers), "Qwen2.5-VL vision tower")
    out = convert_qwen_shared_vision(sd, cfg)
    for i in range(n_layers):
        src, dst = f"blocks.{i}.", f"vision.blocks.{i}."
        out[dst + "ln1.w"], out[dst + "ln2.w"] = sd[src + "norm1.weight"], sd[src + "norm2.weight"]
        for hf, tl in (("gate_proj", "gate"), ("up_proj", "in"), ("down_proj", "out")):
            out[f"{dst}mlp.W_{tl}"] = sd[f"{src}mlp.{hf}.weight"].T
            out[f"{dst}mlp.b_{tl}"] = sd[f"{src}mlp.{hf}.bias"]
    return out


def _expected_vision_params(n_layers: int) -> set[str]:
    keys = shared_vision_params(n_layers)
    for i in range(n_layers):
        p = f"blocks.{i}."
        keys |= {p + "norm1.weight", p + "norm2.weight"}
        keys |= {f"{p}mlp.{m}.{w}" for m in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")}
    return keys


def convert_qwen_vl(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: Qwen2_5_VLConfig,
                    convert_vision: VisionConverter) -> dict[str, torch.Tensor]:
    """A Qwen2-VL / Qwen2.5-VL model: its Qwen2 language model, and its tower through ``convert_vision``."""
    require_known_prefixes(hf_model, _TOP_LEVEL)
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, _AsQwen2(hf_model.config.text_config), cfg)
    state.update(convert_vision(inner.visual, vlm_cfg))
    return state


def convert_qwen2_5_vl(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: Qwen2_5_VLConfig
                       ) -> dict[str, torch.Tensor]:
    return convert_qwen_vl(hf_model, cfg, vlm_cfg, convert_qwen_vision)
