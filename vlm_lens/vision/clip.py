"""A hooked CLIP vision tower built from TransformerLens components.

Pre-layernorm ViT with a class token and learned position embeddings. The blocks are
TransformerLens ``TransformerBlock``s with bidirectional attention, so every hook name inside a
block is the one TransformerLens users know, under the ``vision.`` prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.components import LayerNorm, TransformerBlock
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens.config import VisionConfig, VLMConfig
from vlm_lens.vision.activations import quick_gelu

_ACTIVATIONS = {"quick_gelu": quick_gelu}


def vision_block_config(vcfg: VisionConfig, n_layers: int, dtype: torch.dtype) -> HookedTransformerConfig:
    """A TransformerLens config for the vision blocks (bidirectional, LayerNorm, no rotary)."""
    native_act = vcfg.act_fn not in _ACTIVATIONS
    return HookedTransformerConfig(
        n_layers=max(n_layers, 1),
        d_model=vcfg.d_model,
        n_ctx=vcfg.n_positions,
        d_head=vcfg.d_head,
        n_heads=vcfg.n_heads,
        d_mlp=vcfg.d_mlp,
        d_vocab=1,
        act_fn=vcfg.act_fn if native_act else "gelu",  # replaced below for activations TL rejects
        normalization_type="LN",
        attention_dir="bidirectional",
        positional_embedding_type="standard",
        eps=vcfg.eps,
        dtype=dtype,
        init_weights=False,
        original_architecture=f"{vcfg.family}_vision",
    )


class HookedCLIPVision(nn.Module):
    """CLIP vision transformer up to the deepest feature layer the VLM reads.

    Example:
        >>> feats = model.vision(pixel_values)  # doctest: +SKIP
    """

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        vcfg = cfg.vision
        self.vlm_cfg = cfg
        self.vision_cfg = vcfg
        n_built = cfg.n_vision_layers_used
        self.cfg = vision_block_config(vcfg, n_built, dtype)
        d = vcfg.d_model
        self.W_patch = nn.Parameter(
            torch.empty(d, vcfg.n_channels, vcfg.patch_size, vcfg.patch_size, dtype=dtype)
        )
        self.class_embedding = nn.Parameter(torch.empty(d, dtype=dtype))
        self.W_pos = nn.Parameter(torch.empty(vcfg.n_positions, d, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_images, n_patches, d_vision]
        self.hook_pos_embed = HookPoint()  # [n_images, n_positions, d_vision]
        self.ln_pre = LayerNorm(self.cfg)
        self.blocks = nn.ModuleList([TransformerBlock(self.cfg, i) for i in range(n_built)])
        if vcfg.act_fn in _ACTIVATIONS:
            for block in self.blocks:
                block.mlp.act_fn = _ACTIVATIONS[vcfg.act_fn]

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        vcfg = self.vision_cfg
        expected = (vcfg.n_channels, vcfg.image_size, vcfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, but this vision tower takes "
                f"[n_images, {expected[0]}, {expected[1]}, {expected[2]}] (channels first, resized and "
                "normalised). Prepare images with model.prepare(prompt, images=[...]) or the "
                "checkpoint's image processor."
            )

    def forward(
        self, pixel_values: Float[torch.Tensor, "n_images channels height width"]
    ) -> Float[torch.Tensor, "n_images n_tokens d_features"]:
        """Selected hidden states (concatenated over feature layers), before the projector."""
        self.check_pixels(pixel_values)
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, stride=self.vision_cfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2))
        n = x.shape[0]
        if self.vision_cfg.has_class_token:
            x = torch.cat([self.class_embedding.expand(n, 1, -1), x], dim=1)
        x = x + self.hook_pos_embed(self.W_pos.expand(n, -1, -1))
        x = self.ln_pre(x)
        wanted = set(self.vlm_cfg.feature_layers)
        hidden = {0: x} if 0 in wanted else {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 in wanted:
                hidden[i + 1] = x
        selected = [hidden[i] for i in self.vlm_cfg.feature_layers]
        if self.vlm_cfg.select_strategy == "default" and self.vision_cfg.has_class_token:
            selected = [h[:, 1:] for h in selected]
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0]
