"""What the CLIP and SigLIP towers share: a pre-norm ViT of TransformerLens ``TransformerBlock``s.

Patch embedding (a convolution), learned position embeddings, bidirectional TL blocks built only up to
the deepest feature layer the VLM reads, and the feature-layer selection LLaVA does (hidden states
concatenated over the selected layers). The towers add what differs: CLIP's class token and
``ln_pre``, SigLIP's patch-embedding bias.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.components import TransformerBlock
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens.config import VisionConfig, VLMConfig
from vlm_lens.vision.activations import quick_gelu

# Activations TransformerLens does not implement; blocks get them after construction.
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


class HookedViT(nn.Module):
    """The shared part of the CLIP and SigLIP towers (parameters allocated, never initialised)."""

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32, drop_class_token: bool = False):
        super().__init__()
        vcfg = cfg.vision
        if drop_class_token and not vcfg.has_class_token:
            raise ValueError(f"drop_class_token=True, but the {vcfg.family} tower has no class token (it would "
                             "drop a patch); keep every token (LLaVA: vision_feature_select_strategy='full').")
        self.drop_class_token = drop_class_token
        self.vlm_cfg = cfg
        self.vision_cfg = vcfg
        n_built = cfg.n_vision_layers_used
        self.cfg = vision_block_config(vcfg, n_built, dtype)
        self.W_patch = nn.Parameter(
            torch.empty(vcfg.d_model, vcfg.n_channels, vcfg.patch_size, vcfg.patch_size, dtype=dtype)
        )
        self.W_pos = nn.Parameter(torch.empty(vcfg.n_positions, vcfg.d_model, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_images, n_patches, d_vision]
        self.hook_pos_embed = HookPoint()  # [n_images, n_positions, d_vision]
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

    def selected_hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks on the embedded sequence ``x`` and return the hidden states of the VLM's
        feature layers (0 = the blocks' input), concatenated on the last dim, without the class token
        where ``drop_class_token`` (LLaVA's "default" strategy)."""
        drop_first = self.drop_class_token
        wanted = set(self.vlm_cfg.feature_layers)
        hidden = {0: x} if 0 in wanted else {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 in wanted:
                hidden[i + 1] = x
        selected = [hidden[i][:, 1:] if drop_first else hidden[i] for i in self.vlm_cfg.feature_layers]
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0]
