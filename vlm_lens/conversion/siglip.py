"""SigLIP vision towers: HF ``SiglipVisionConfig`` -> ``VisionConfig`` and weights -> ``vision.*``."""

from __future__ import annotations

from typing import Any

import torch

from vlm_lens.config import VisionConfig, VLMConfig
from vlm_lens.conversion.checks import require_exact_keys
from vlm_lens.conversion.clip import (  # SigLIP's blocks are laid out as CLIP's
    convert_vit_blocks,
    vit_block_params,
    vit_vision_config,
)


def siglip_vision_config(hf_vision: Any) -> VisionConfig:
    for name in ("image_size", "patch_size"):
        if not isinstance(getattr(hf_vision, name), int):
            raise ValueError(
                f"SigLIP {name}={getattr(hf_vision, name)!r}: vlm_lens supports square tiles and patches only "
                "(an int)."
            )
    return vit_vision_config(hf_vision, "siglip", has_class_token=False)


def convert_siglip_vision(vision_model: torch.nn.Module, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` weights from an HF ``SiglipVisionModel`` (or its ``.vision_model``).

    ``post_layernorm``, the attention-pooling ``head`` and blocks after the deepest selected feature
    layer are never used by a VLM; they are checked for and left out on purpose.
    """
    sd = dict(vision_model.named_parameters())
    vcfg = cfg.vision
    use_head = bool(getattr(vision_model.config, "vision_use_head", True))
    require_exact_keys(sd.keys(), _expected_siglip_params(vcfg.n_layers, use_head), "SigLIP vision tower")
    out = {
        "vision.W_patch": sd["embeddings.patch_embedding.weight"],
        "vision.b_patch": sd["embeddings.patch_embedding.bias"],
        "vision.W_pos": sd["embeddings.position_embedding.weight"],
    }
    out.update(convert_vit_blocks(sd, cfg.n_vision_layers_used, vcfg.n_heads))
    return out


def _expected_siglip_params(n_layers: int, use_head: bool) -> set[str]:
    keys = {
        "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
        "embeddings.position_embedding.weight", "post_layernorm.weight", "post_layernorm.bias",
    }
    keys |= vit_block_params(n_layers)
    if use_head:
        keys |= {"head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
                 "head.attention.out_proj.weight", "head.attention.out_proj.bias"}
        keys |= {f"head.{m}.{w}" for m in ("layernorm", "mlp.fc1", "mlp.fc2") for w in ("weight", "bias")}
    return keys
