"""Token embedding that writes image embeddings over the image-token positions.

It replaces TransformerLens's ``Embed`` inside ``HookedVLM`` (same ``W_E`` parameter, same state-dict
key), so ``hook_embed`` sees the merged sequence: text embeddings with the image embeddings in place.
What to write comes from the current call's context (``vlm_lens.context.CALL``), never from the module.
"""

from __future__ import annotations

import torch
from transformer_lens.components import Embed

from vlm_lens.context import CALL


class MergingEmbed(Embed):
    """``Embed`` plus the merge of the current ``HookedVLM`` call's image embeddings."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embed = super().forward(tokens)
        call = CALL.get()
        if call is None or call.image_mask is None:
            return embed
        mask = call.image_mask
        if mask.shape[1] < tokens.shape[1]:  # generation without KV cache: new tokens are text
            pad = mask.new_zeros(mask.shape[0], tokens.shape[1] - mask.shape[1])
            mask = torch.cat([mask, pad], dim=1)
        mask = mask.to(embed.device)[..., None]
        return embed.masked_scatter(mask, call.image_embeds.to(device=embed.device, dtype=embed.dtype))
