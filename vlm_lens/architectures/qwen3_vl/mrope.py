"""Interleaved multimodal rotary positions (Qwen3-VL's M-RoPE).

The position ids are Qwen2.5-VL's (``vlm_lens.architectures.qwen2_5_vl.mrope.rope_index``: time, row and
column of each image token, one running position for text). What differs is which id each rotary frequency
reads: Qwen2.5-VL gives consecutive chunks of ``mrope_section`` frequencies to time, row and column; Qwen3-VL
interleaves them. Frequency ``j`` reads the row id if ``j % 3 == 1`` and ``j < 3 * section[1]``, the column
id if ``j % 3 == 2`` and ``j < 3 * section[2]``, and the time id otherwise (transformers'
``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int


def interleaved_axes(n_freqs: int, section: Sequence[int]) -> torch.Tensor:
    """[n_freqs] which id (0 time, 1 row, 2 column) each rotary frequency reads."""
    j = torch.arange(n_freqs)
    axes = torch.zeros(n_freqs, dtype=torch.long)
    axes[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axes[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axes


def interleaved_cos_sin(position_ids: Int[torch.Tensor, "3 batch pos"], d_head: int, base: float,
                        section: Sequence[int], dtype: torch.dtype
                        ) -> tuple[Float[torch.Tensor, "batch pos d_head"], Float[torch.Tensor, "batch pos d_head"]]:
    """cos and sin of the interleaved M-RoPE angles, computed in float32 as transformers does."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float) / d_head))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, batch, pos, d_head/2]
    axes = interleaved_axes(d_head // 2, section).to(position_ids.device)
    freqs = freqs.permute(1, 2, 3, 0)[..., torch.arange(d_head // 2, device=axes.device), axes]
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)
