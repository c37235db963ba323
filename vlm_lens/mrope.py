"""Multimodal rotary positions (M-RoPE) for Qwen2.5-VL's language model.

Every token has three position ids (time, row, column). Text tokens carry one running position in all
three; an image's tokens carry the row and column of their merged-grid cell (offset by the position the
image starts at) and the image advances the running position by ``max(rows, cols)``. Each third of the
rotary frequencies (``mrope_section``) reads one of the three ids. This mirrors transformers'
``Qwen2_5_VLModel.get_rope_index`` and ``Qwen2_5_VLRotaryEmbedding`` for images (videos are not supported).

``MRopeAttention`` is TransformerLens's ``GroupedQueryAttention`` with only ``apply_rotary`` replaced, so
every hook (``hook_q``, ``hook_k``, ``hook_rot_q``, ``hook_rot_k``, ``hook_attn_scores``, ...) keeps its
name, shape and place. It reads the position ids of the current call from an ``MRopeState`` that the
Qwen2.5-VL pipeline fills around each forward pass (``Qwen2_5_VLPipeline.forward_context``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from transformer_lens.components import GroupedQueryAttention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension: the GPT-NeoX pairing Qwen uses."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


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
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    out = torch.zeros(3, *image_mask.shape, dtype=torch.long)
    used = 0
    for b in range(image_mask.shape[0]):
        keep = torch.ones(image_mask.shape[1], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        is_image = image_mask[b].cpu()[keep].tolist()
        parts, pos, i = [], 0, 0
        while i < len(is_image):
            if not is_image[i]:
                j = i
                while j < len(is_image) and not is_image[j]:
                    j += 1
                parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos, i = pos + j - i, j
                continue
            if used == len(grids):
                raise ValueError(f"batch row {b} has more image tokens than the {len(grids)} image(s) in "
                                 "image_grid_thw describe; pass one image_grid_thw row per image.")
            t, h, w = grids[used]
            n = t * h * w // spatial_merge_size**2
            if i + n > len(is_image) or not all(is_image[i:i + n]):
                raise ValueError(f"batch row {b}: image {used} (grid {grids[used]}) needs {n} consecutive image "
                                 "tokens, which the tokens do not hold; expand prompts with model.prepare.")
            parts.append(image_position_ids(grids[used], spatial_merge_size, pos))
            pos, i, used = pos + max(h, w) // spatial_merge_size, i + n, used + 1
        if parts:
            out[:, b, keep] = torch.cat(parts, dim=1)
    if used != len(grids):
        raise ValueError(f"image_grid_thw describes {len(grids)} images but the tokens hold {used}.")
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


class MRopeState:
    """Position ids of the keys of the current call, shared by every ``MRopeAttention`` of one model.

    ``position_ids`` is [3, batch, kv_pos] (cached keys first); None outside a forward pass, where the
    attention falls back to TransformerLens's 1-D rotary (the same as M-RoPE for text-only input).
    """

    def __init__(self, section: Sequence[int], base: float, d_head: int):
        self.section, self.base, self.d_head = tuple(section), float(base), d_head
        self.position_ids: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def set(self, position_ids: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.position_ids = position_ids
        self._cos_sin = None if position_ids is None else mrope_cos_sin(
            position_ids, self.d_head, self.base, self.section, dtype)

    def cos_sin(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin
        if start + length > cos.shape[1]:
            raise ValueError(f"M-RoPE positions cover {cos.shape[1]} keys but positions {start}..{start + length} "
                             "were asked for; the forward context and the KV cache disagree.")
        return cos[:, start:start + length], sin[:, start:start + length]


class MRopeAttention(GroupedQueryAttention):
    """``GroupedQueryAttention`` whose rotary reads 3-D position ids; every other step is TransformerLens's.

    Installed on the language model by ``install_mrope`` (its ``__class__`` is swapped, no parameter is
    copied); ``vlm_lens.fast`` leaves it alone because it swaps exact TransformerLens types only.
    """

    mrope: MRopeState

    def apply_rotary(self, x: torch.Tensor, past_kv_pos_offset: int = 0,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.mrope.position_ids is None:
            return super().apply_rotary(x, past_kv_pos_offset, attention_mask)
        cos, sin = self.mrope.cos_sin(past_kv_pos_offset, x.shape[1])
        cos, sin = cos[:, :, None].to(x.device), sin[:, :, None].to(x.device)
        return x * cos + rotate_half(x) * sin


def install_mrope(model: Any, state: MRopeState) -> None:
    """Turn every language-model attention layer of ``model`` into an ``MRopeAttention`` reading ``state``."""
    for i, block in enumerate(model.blocks):
        if not isinstance(block.attn, GroupedQueryAttention):
            raise ValueError(f"blocks.{i}.attn is a {type(block.attn).__name__}; M-RoPE needs TransformerLens's "
                             "GroupedQueryAttention (a Qwen2 language model).")
        block.attn.__class__ = MRopeAttention
        block.attn.mrope = state
