"""Multimodal rotary positions (M-RoPE) for Qwen2.5-VL's language model.

Every token has three position ids (time, row, column). Text tokens carry one running position in all
three; an image's tokens carry the row and column of their merged-grid cell (offset by the position the
image starts at) and the image advances the running position by ``max(rows, cols)``. Each third of the
rotary frequencies (``mrope_section``) reads one of the three ids. This mirrors transformers'
``Qwen2_5_VLModel.get_rope_index`` and ``Qwen2_5_VLRotaryEmbedding`` for images (videos are not supported).

The language model's attention layers stay TransformerLens's ``GroupedQueryAttention``; only the rotary is
replaced (``vlm_lens._tl.components.with_external_rotary``), so every hook keeps its name, shape and place.
The rotary reads the position ids of the current call (``vlm_lens.context.CALL``), which
``Qwen2_5_VLPipeline.positions`` computes for each forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int

from vlm_lens.context import CALL
from vlm_lens.layout import split_image_tokens
from vlm_lens.rotary import rotate_half


def image_position_ids(grid_thw: Sequence[int], merge: int, start: int) -> torch.Tensor:
    """[3, n_tokens] (time, row, column) ids of one image's merged tokens, row-major, offset by ``start``."""
    t, h, w = (int(v) for v in grid_thw)
    times, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge),
                                       indexing="ij")
    return torch.stack([times, rows, cols]).reshape(3, -1) + start


def rope_index(image_mask: Bool[torch.Tensor, "batch pos"], spatial_merge_size: int,
               image_grid_thw: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> Int[torch.Tensor, "3 batch pos"]:
    """3-D position ids as transformers' ``get_rope_index`` computes them (padding gets 0).

    ``image_mask`` marks the image tokens (``tokens == image_token_id``). Runs of image tokens are split
    into images by their token counts (``t*h*w / merge**2`` each, from ``image_grid_thw`` in order), so
    two images need no separator between them.
    """
    merge = spatial_merge_size
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    keep = torch.ones(image_mask.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    images: dict[int, dict[int, tuple[int, torch.Tensor]]] = {}  # row -> first position -> (image, positions)
    sizes = [t * h * w // merge**2 for t, h, w in grids]
    for b, k, chunk in split_image_tokens(image_mask.cpu() & keep, sizes, "image_grid_thw",
                                          lambda k: f"grid {list(grids[k])}"):
        images.setdefault(b, {})[int(chunk[0])] = (k, chunk)
    out = torch.zeros(3, *image_mask.shape, dtype=torch.long)
    for b in range(image_mask.shape[0]):
        kept = keep[b].nonzero().flatten().tolist()
        parts, pos, i, starts = [], 0, 0, images.get(b, {})
        while i < len(kept):
            if kept[i] in starts:
                k, chunk = starts[kept[i]]
                parts.append(image_position_ids(grids[k], merge, pos))
                pos, i = pos + max(grids[k][1:]) // merge, i + len(chunk)
                continue
            j = i
            while j < len(kept) and kept[j] not in starts:
                j += 1
            parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
        if parts:
            out[:, b, keep[b]] = torch.cat(parts, dim=1)
    return out.to(image_mask.device)


def mrope_cos_sin(position_ids: torch.Tensor, d_head: int, base: float, section: Sequence[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, pos, d_head] cos and sin: frequency band k of ``section`` reads id k (time, row, column)."""
    if sum(section) != d_head // 2:
        raise ValueError(f"mrope_section {list(section)} must add up to d_head / 2 = {d_head // 2}.")
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float) / d_head))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, batch, pos, d_head/2]
    chunks = freqs.split(list(section), dim=-1)
    freqs = torch.cat([chunk[k % 3] for k, chunk in enumerate(chunks)], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


@dataclass(frozen=True)
class MRopePositions:
    """The position ids of one call's keys ([3, batch, kv_pos], cached keys first) and their cos/sin."""

    ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor, d_head: int, base: float, section: Sequence[int],
           dtype: torch.dtype) -> MRopePositions:
        return cls(ids, *mrope_cos_sin(ids, d_head, base, section, dtype))


def mrope_rotary(x: torch.Tensor, offset: int) -> torch.Tensor | None:
    """Rotate queries or keys ``x`` [batch, pos, head, d_head] that start at key position ``offset`` by the
    current call's M-RoPE positions; None outside a call with positions (TransformerLens's 1-D rotary,
    the same as M-RoPE for text-only input)."""
    call = CALL.get()
    if call is None or not isinstance(call.positions, MRopePositions):
        return None
    cos, sin = call.positions.cos, call.positions.sin
    if offset + x.shape[1] > cos.shape[1]:
        raise ValueError(f"M-RoPE positions cover {cos.shape[1]} keys but positions {offset}..{offset + x.shape[1]} "
                         "were asked for; the forward context and the KV cache disagree.")
    cos, sin = cos[:, offset:offset + x.shape[1], None].to(x.device), sin[:, offset:offset + x.shape[1], None].to(x.device)
    return x * cos + rotate_half(x) * sin
