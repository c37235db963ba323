"""Token embedding that writes image embeddings over the image-token positions.

It replaces TransformerLens's ``Embed`` inside ``HookedVLM`` (same ``W_E`` parameter, same state-dict
key), so ``hook_embed`` sees the merged sequence: text embeddings with the image embeddings in place.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformer_lens.components import Embed


class MergingEmbed(Embed):
    """``Embed`` plus an optional pending merge set by ``HookedVLM.forward`` for one call."""

    _image_mask: torch.Tensor | None = None  # [batch, pos] bool
    _image_embeds: torch.Tensor | None = None  # [n_image_tokens_total, d_model]

    @contextmanager
    def merging(self, image_mask: torch.Tensor | None, image_embeds: torch.Tensor | None):
        self._image_mask, self._image_embeds = image_mask, image_embeds
        try:
            yield
        finally:
            self._image_mask = self._image_embeds = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embed = super().forward(tokens)
        mask, image_embeds = self._image_mask, self._image_embeds
        if mask is None:
            return embed
        if mask.shape[1] < tokens.shape[1]:  # generation without KV cache: new tokens are text
            pad = mask.new_zeros(mask.shape[0], tokens.shape[1] - mask.shape[1])
            mask = torch.cat([mask, pad], dim=1)
        mask = mask.to(embed.device)[..., None]
        return embed.masked_scatter(mask, image_embeds.to(device=embed.device, dtype=embed.dtype))
