"""Mllama weights: the self-attention layers through TransformerLens's ``convert_llama_weights`` (fed a stand-in
holding only them, then renumbered to HF's layer indices); the cross-attention layers, the tower and the
projector converted here."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import einops
import torch
from torch import nn
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

from vlm_lens._tl.weights import convert_with_tl
from vlm_lens.architectures.checks import require_known_prefixes
from vlm_lens.architectures.mllama.config import MllamaConfig

_TOP_LEVEL = ("model.language_model.", "model.vision_model.", "model.multi_modal_projector.", "lm_head.")


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    return einops.rearrange(w, "(n h) m -> n m h", n=n)


def convert_cross_layer(layer: nn.Module, dst: str, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    """A ``MllamaCrossAttentionDecoderLayer`` -> ``CrossAttentionBlock``."""
    a, n_kv = layer.cross_attn, cfg.n_key_value_heads or cfg.n_heads
    out = {f"{dst}ln_cross.w": layer.input_layernorm.weight, f"{dst}ln2.w": layer.post_attention_layernorm.weight,
           f"{dst}attn_gate": layer.cross_attn_attn_gate, f"{dst}mlp_gate": layer.cross_attn_mlp_gate,
           f"{dst}cross_attn.W_Q": _heads(a.q_proj.weight, cfg.n_heads),
           f"{dst}cross_attn.W_K": _heads(a.k_proj.weight, n_kv), f"{dst}cross_attn.W_V": _heads(a.v_proj.weight, n_kv),
           f"{dst}cross_attn.W_O": einops.rearrange(a.o_proj.weight, "m (n h) -> n h m", n=cfg.n_heads),
           f"{dst}cross_attn.q_norm.w": a.q_norm.weight, f"{dst}cross_attn.k_norm.w": a.k_norm.weight,
           f"{dst}mlp.W_in": layer.mlp.up_proj.weight.T, f"{dst}mlp.W_gate": layer.mlp.gate_proj.weight.T,
           f"{dst}mlp.W_out": layer.mlp.down_proj.weight.T}
    out[f"{dst}mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=cfg.dtype)
    out[f"{dst}mlp.b_out"] = torch.zeros(cfg.d_model, dtype=cfg.dtype)
    return out


def convert_language_model(text: nn.Module, lm_head: nn.Module, cfg: HookedTransformerConfig,
                           cross_layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    self_layers = [i for i in range(cfg.n_layers) if i not in cross_layers]
    stand_in = nn.Module()  # the text model with its self-attention layers only, numbered 0, 1, ...
    stand_in.embed_tokens, stand_in.norm = text.embed_tokens, text.norm
    stand_in.layers = nn.ModuleList(text.layers[i] for i in self_layers)
    state = convert_with_tl(convert_llama_weights, stand_in, lm_head,
                            dataclasses.replace(cfg, n_layers=len(self_layers)))
    renumber = lambda m: f"blocks.{self_layers[int(m.group(1))]}."  # noqa: E731
    state = {re.sub(r"^blocks\.(\d+)\.", renumber, k): v for k, v in state.items()}
    state["unembed.b_U"] = torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype)  # TL sizes it by d_vocab (embedding rows)
    for i in cross_layers:
        state.update(convert_cross_layer(text.layers[i], f"blocks.{i}.", cfg))
    return state


def _block(layer: nn.Module, dst: str, n_heads: int, d: int, gated: bool) -> dict[str, torch.Tensor]:
    a, zeros = layer.self_attn, torch.zeros(n_heads, d // n_heads, dtype=layer.self_attn.q_proj.weight.dtype)
    out = {f"{dst}attn.W_{x}": _heads(getattr(a, f"{x.lower()}_proj").weight, n_heads) for x in "QKV"}
    out.update({f"{dst}attn.b_{x}": zeros for x in "QKV"})
    out[f"{dst}attn.W_O"] = einops.rearrange(a.o_proj.weight, "m (n h) -> n h m", n=n_heads)
    out[f"{dst}attn.b_O"] = torch.zeros(d, dtype=zeros.dtype)
    for hf, tl in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
        norm = getattr(layer, hf)
        out[f"{dst}{tl}.w"], out[f"{dst}{tl}.b"] = norm.weight, norm.bias
    out[f"{dst}mlp.W_in"], out[f"{dst}mlp.b_in"] = layer.mlp.fc1.weight.T, layer.mlp.fc1.bias
    out[f"{dst}mlp.W_out"], out[f"{dst}mlp.b_out"] = layer.mlp.fc2.weight.T, layer.mlp.fc2.bias
    if gated:
        out[f"{dst}gate_attn"], out[f"{dst}gate_ffn"] = layer.gate_attn, layer.gate_ffn
    return out


def convert_vision(vm: nn.Module, cfg: MllamaConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` from an HF ``MllamaVisionModel``."""
    v = cfg.vision
    pos, pre, post = vm.gated_positional_embedding, vm.pre_tile_positional_embedding, vm.post_tile_positional_embedding
    out = {"vision.W_patch": vm.patch_embedding.weight, "vision.class_embedding": vm.class_embedding,
           "vision.W_pos": pos.embedding, "vision.W_tile_pos": pos.tile_embedding.weight, "vision.pos_gate": pos.gate,
           "vision.W_pre_tile": pre.embedding.weight, "vision.pre_tile_gate": pre.gate,
           "vision.W_post_tile": post.embedding.weight, "vision.post_tile_gate": post.gate}
    for hf, tl in (("layernorm_pre", "ln_pre"), ("layernorm_post", "ln_post")):
        out[f"vision.{tl}.w"], out[f"vision.{tl}.b"] = getattr(vm, hf).weight, getattr(vm, hf).bias
    for i, layer in enumerate(vm.transformer.layers):
        out.update(_block(layer, f"vision.blocks.{i}.", v.n_heads, v.d_model, gated=False))
    for i, layer in enumerate(vm.global_transformer.layers):
        out.update(_block(layer, f"vision.global_blocks.{i}.", v.n_heads, v.d_model, gated=True))
    return out


def convert_mllama(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: MllamaConfig) -> dict[str, torch.Tensor]:
    """The HookedVLM state dict (the loader checks its keys equal the model's)."""
    require_known_prefixes(hf_model, _TOP_LEVEL)
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, cfg, vlm_cfg.cross_attention_layers)
    state.update(convert_vision(inner.vision_model, vlm_cfg))
    proj = inner.multi_modal_projector
    state["projector.W"], state["projector.b"] = proj.weight.T, proj.bias
    return state
