"""Qwen2-VL weights: the language model, attention, patch embedding and merger MLP as Qwen2.5-VL converts them;
here the parts that differ: LayerNorms with biases (blocks and ``ln_q``) and the ``fc1``/``fc2`` MLP."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.checks import require_exact_keys
from vlm_lens.architectures.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlm_lens.architectures.qwen2_5_vl.convert import (
    convert_qwen_shared_vision,
    convert_qwen_vl,
    shared_vision_params,
)

_NORMS = (("norm1", "ln1"), ("norm2", "ln2"))
_MLP = (("fc1", "in"), ("fc2", "out"))


def convert_qwen2_vision(visual: torch.nn.Module, cfg: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` and ``projector.*`` weights from an HF ``Qwen2VisionTransformerPretrainedModel``."""
    sd = dict(visual.named_parameters())
    n_layers = cfg.vision.n_layers
    require_exact_keys(sd.keys(), _expected_params(n_layers), "Qwen2-VL vision tower")
    out = convert_qwen_shared_vision(sd, cfg)
    out["projector.ln_q.b"] = sd["merger.ln_q.bias"]
    for i in range(n_layers):
        src, dst = f"blocks.{i}.", f"vision.blocks.{i}."
        for hf, tl in _NORMS:
            out[f"{dst}{tl}.w"], out[f"{dst}{tl}.b"] = sd[f"{src}{hf}.weight"], sd[f"{src}{hf}.bias"]
        for hf, tl in _MLP:
            out[f"{dst}mlp.W_{tl}"] = sd[f"{src}mlp.{hf}.weight"].T
            out[f"{dst}mlp.b_{tl}"] = sd[f"{src}mlp.{hf}.bias"]
    return out


def _expected_params(n_layers: int) -> set[str]:
    keys = shared_vision_params(n_layers) | {"merger.ln_q.bias"}
    for i in range(n_layers):
        keys |= {f"blocks.{i}.{m}.{w}" for m, _ in _NORMS for w in ("weight", "bias")}
        keys |= {f"blocks.{i}.mlp.{m}.{w}" for m, _ in _MLP for w in ("weight", "bias")}
    return keys


def convert_qwen2_vl(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    return convert_qwen_vl(hf_model, cfg, vlm_cfg, convert_qwen2_vision)
