"""Idefics3 / SmolVLM weights: the Llama language model through TransformerLens's converter, the SigLIP-like
tower (blocks laid out as SigLIP's) and the connector's projection here."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.idefics3.config import Idefics3Config
from vlm_lens.architectures.language import convert_language_model
from vlm_lens.vision.convert import convert_vit_blocks, vit_block_params

_TOP_LEVEL = ("model.text_model.", "model.vision_model.", "model.connector.", "lm_head.")
_EMBEDDINGS = ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
               "embeddings.position_embedding.weight", "post_layernorm.weight", "post_layernorm.bias")


def convert_idefics3_vision(vision_model: torch.nn.Module, cfg: Idefics3Config) -> dict[str, torch.Tensor]:
    """``vision.*`` weights from an HF ``Idefics3VisionTransformer`` (or SmolVLM's)."""
    sd = dict(vision_model.named_parameters())
    vcfg = cfg.vision
    require_exact_keys(sd.keys(), set(_EMBEDDINGS) | vit_block_params(vcfg.n_layers), "Idefics3 vision tower")
    out = {"vision.W_patch": sd["embeddings.patch_embedding.weight"],
           "vision.b_patch": sd["embeddings.patch_embedding.bias"],
           "vision.W_pos": sd["embeddings.position_embedding.weight"],
           "vision.ln_final.w": sd["post_layernorm.weight"], "vision.ln_final.b": sd["post_layernorm.bias"]}
    out.update(convert_vit_blocks(sd, vcfg.n_layers, vcfg.n_heads))
    return out


def convert_idefics3(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: Idefics3Config) -> dict[str, torch.Tensor]:
    require_known_prefixes(hf_model, _TOP_LEVEL)
    inner = hf_model.model
    state = convert_language_model(inner.text_model, hf_model.lm_head, hf_model.config.text_config, cfg)
    state.update(convert_idefics3_vision(inner.vision_model, vlm_cfg))
    connector = dict(inner.connector.named_parameters())
    require_exact_keys(connector.keys(), {"modality_projection.proj.weight"}, "Idefics3 connector")
    state["projector.W_proj"] = connector["modality_projection.proj.weight"].T
    return state
