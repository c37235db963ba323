"""Attention masks for vision towers that take each image at its own size, padded to one length.

Towers that take each image at its own size (the dynamic-resolution families) run a call's images as one
batch, each padded at the end to the largest. A patch attends to the patches of its own image; a padding
row attends to itself alone. With no key at all its softmax would be NaN: TransformerLens zeroes NaN
patterns in the forward, but the backward through them is NaN and, through the shared keys, reaches every
real patch (d loss / d pixels was NaN for the smaller images). Padding rows are dropped before the projector, so what they
attend to changes nothing downstream.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float


def within_image(valid: Bool[torch.Tensor, "n_images n"]) -> Bool[torch.Tensor, "n_images n n"]:
    """(query, key) pairs that may attend: both in the image, or a padding query with itself."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return (valid[:, :, None] & valid[:, None, :]) | (eye & ~valid[:, :, None])


def additive(allowed: Bool[torch.Tensor, "n_images n n"], dtype: torch.dtype,
             device: torch.device | str | None = None) -> Float[torch.Tensor, "n_images 1 n n"]:
    """0 where ``allowed``, -inf elsewhere, with a head axis: the additive mask the attention adds."""
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    return mask[:, None].to(device or allowed.device)
