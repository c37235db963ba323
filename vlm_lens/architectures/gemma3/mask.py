"""Gemma 3's attention over images: an image's tokens attend to each other in both directions.

transformers' ``Gemma3Model`` builds, from the processor's ``token_type_ids``, a block id per position (each
run of consecutive image tokens is one block, text is -1) and lets a query attend to every key of its own
block on top of the causal mask; a sliding-window layer then still keeps only keys inside its window
(``create_masks_for_vision_model``: AND(window, OR(causal, block))). transformers applies this only when
``token_type_ids`` are passed; ``model.prepare`` always gets them from the processor, and vlm_lens always
applies it (the image tokens are exactly the positions with token type 1).

Here the blocks come from the current call's image positions (``vlm_lens.context.CALL.image_mask``) and are
given to every language-model attention layer through ``vlm_lens._tl.components.with_attention_overlay``,
so the mask is in the scores before ``hook_attn_scores`` (attention knockout adds to it). Inside ``generate``
with the KV cache only the prompt's forward has images; the new tokens are text, which attends causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int

from vlm_lens.context import CALL


def image_blocks(image_mask: Bool[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """Block id of each position: runs of image tokens numbered from 0 in each row, -1 for text
    (transformers' ``get_block_sequence_ids_for_mask``).

    Example:
        >>> image_blocks(torch.tensor([[False, True, True, False, True]]))
        tensor([[-1,  0,  0, -1,  1]])
    """
    previous = F.pad(image_mask, (1, 0), value=False)[:, :-1]
    starts = image_mask & ~previous
    return torch.where(image_mask, starts.long().cumsum(dim=1) - 1, -1)


def image_block_overlay(n_queries: int, n_keys: int, offset: int, device: torch.device) -> torch.Tensor | None:
    """[batch, 1, n_queries, n_keys]: True where query and key are tokens of the same image; None without
    images. The call's image mask covers the positions from ``offset`` on (the prompt, in ``generate``
    without the KV cache, where later positions are generated text)."""
    call = CALL.get()
    if call is None or call.image_mask is None or not bool(call.image_mask.any()):
        return None
    mask = call.image_mask.to(device=device, dtype=torch.bool)
    if offset + mask.shape[1] > n_keys:
        raise ValueError(f"The call's image mask covers {mask.shape[1]} positions from {offset}, past the {n_keys} keys "
                         "of this attention layer; the forward context and the KV cache disagree.")
    blocks = image_blocks(F.pad(mask, (offset, n_keys - offset - mask.shape[1]), value=False))
    queries = blocks[:, offset:offset + n_queries, None]
    return ((queries == blocks[:, None, :]) & (queries >= 0))[:, None]
