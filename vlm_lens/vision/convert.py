"""CLIP and SigLIP vision towers: HF vision configs -> ``VisionConfig`` and weights -> ``vision.*``.

Shared by every family with one of these towers (the LLaVA line today); SigLIP's blocks are laid out as
CLIP's."""

from __future__ import annotations

from typing import Any

import einops
import torch

from vlm_lens.architectures.checks import require_exact_keys
from vlm_lens.config import VisionConfig, VLMConfig


def vit_vision_config(hf_vision: Any, family: str, has_class_token: bool) -> VisionConfig:
    """``VisionConfig`` from an HF ViT-style vision config (CLIP and SigLIP share these field names)."""
    return VisionConfig(
        family=family,
        d_model=hf_vision.hidden_size,
        n_heads=hf_vision.num_attention_heads,
        d_mlp=hf_vision.intermediate_size,
        n_layers=hf_vision.num_hidden_layers,
        image_size=hf_vision.image_size,
        patch_size=hf_vision.patch_size,
        eps=hf_vision.layer_norm_eps,
        act_fn=hf_vision.hidden_act,
        n_channels=hf_vision.num_channels,
        has_class_token=has_class_token,
    )


def clip_vision_config(hf_vision: Any) -> VisionConfig:
    return vit_vision_config(hf_vision, "clip", has_class_token=True)


def _attention(sd: dict[str, torch.Tensor], src: str, dst: str, n_heads: int) -> dict[str, torch.Tensor]:
    out = {}
    for hf, tl in (("q", "Q"), ("k", "K"), ("v", "V")):
        out[f"{dst}W_{tl}"] = einops.rearrange(sd[f"{src}{hf}_proj.weight"], "(n h) m -> n m h", n=n_heads)
        out[f"{dst}b_{tl}"] = einops.rearrange(sd[f"{src}{hf}_proj.bias"], "(n h) -> n h", n=n_heads)
    out[f"{dst}W_O"] = einops.rearrange(sd[f"{src}out_proj.weight"], "m (n h) -> n h m", n=n_heads)
    out[f"{dst}b_O"] = sd[f"{src}out_proj.bias"]
    return out


def convert_clip_vision(vision_model: torch.nn.Module, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` weights from an HF ``CLIPVisionTransformer`` (the ``.vision_model``).

    Blocks after the deepest selected feature layer and ``post_layernorm`` are not used by LLaVA;
    they are left out on purpose, and every other weight must be consumed.
    """
    sd = dict(vision_model.named_parameters())
    vcfg = cfg.vision
    require_exact_keys(sd.keys(), _expected_clip_params(vcfg.n_layers), "CLIP vision tower")
    out = {
        "vision.W_patch": sd["embeddings.patch_embedding.weight"],
        "vision.class_embedding": sd["embeddings.class_embedding"],
        "vision.W_pos": sd["embeddings.position_embedding.weight"],
        "vision.ln_pre.w": sd["pre_layrnorm.weight"],
        "vision.ln_pre.b": sd["pre_layrnorm.bias"],
    }
    out.update(convert_vit_blocks(sd, cfg.n_vision_layers_used, vcfg.n_heads))
    return out


def _expected_clip_params(n_layers: int) -> set[str]:
    keys = {
        "embeddings.patch_embedding.weight", "embeddings.class_embedding",
        "embeddings.position_embedding.weight", "pre_layrnorm.weight", "pre_layrnorm.bias",
        "post_layernorm.weight", "post_layernorm.bias",
    }
    keys |= vit_block_params(n_layers)
    return keys


def convert_vit_blocks(sd: dict[str, torch.Tensor], n_built: int, n_heads: int) -> dict[str, torch.Tensor]:
    """``vision.blocks.*`` from HF ``encoder.layers.*`` (CLIP and SigLIP lay their blocks out alike)."""
    out = {}
    for i in range(n_built):
        src, dst = f"encoder.layers.{i}.", f"vision.blocks.{i}."
        out.update(_attention(sd, src + "self_attn.", dst + "attn.", n_heads))
        out[dst + "ln1.w"], out[dst + "ln1.b"] = sd[src + "layer_norm1.weight"], sd[src + "layer_norm1.bias"]
        out[dst + "ln2.w"], out[dst + "ln2.b"] = sd[src + "layer_norm2.weight"], sd[src + "layer_norm2.bias"]
        out[dst + "mlp.W_in"], out[dst + "mlp.b_in"] = sd[src + "mlp.fc1.weight"].T, sd[src + "mlp.fc1.bias"]
        out[dst + "mlp.W_out"], out[dst + "mlp.b_out"] = sd[src + "mlp.fc2.weight"].T, sd[src + "mlp.fc2.bias"]
    return out


def vit_block_params(n_layers: int) -> set[str]:
    """HF parameter names of ``n_layers`` CLIP/SigLIP encoder blocks."""
    keys: set[str] = set()
    for i in range(n_layers):
        p = f"encoder.layers.{i}."
        keys |= {f"{p}self_attn.{x}_proj.{w}" for x in ("q", "k", "v", "out") for w in ("weight", "bias")}
        keys |= {f"{p}{m}.{w}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
                 for w in ("weight", "bias")}
    return keys


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
