"""Removing image tokens from the deepstack path too.

``vlm_lens.analysis.image_ablation_hooks`` replaces rows of ``hook_image_embeds``, which is where an image
token enters the sequence. In Qwen3-VL the same token enters again after each of the first layers, through
the deepstack features; ``deepstack_ablation_hooks`` zeroes those rows, so the two together take the token's
image content out of every place it enters the language model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vlm_lens.analysis.ablation import embed_indices
from vlm_lens.inputs import VLMInputs


def deepstack_ablation_hooks(inputs: VLMInputs, positions: Any, n_deepstack: int) -> list[tuple[str, Callable]]:
    """Hooks zeroing the deepstack features of the image tokens at ``positions`` (one tensor, or one per batch
    row, as ``image_ablation_hooks``) in ``deepstack.{k}.hook_out`` for ``k < n_deepstack``
    (``model.vlm_cfg.n_deepstack``). Fired once per image encode, so also safe inside ``generate``.

    Example (with ``image_ablation_hooks(inputs, grid, "zero")`` for the first entry point too):
        >>> hooks = deepstack_ablation_hooks(inputs, inputs.layout.grid(0).flatten(), n_deepstack=2)
        >>> [name for name, _ in hooks]
        ['deepstack.0.hook_out', 'deepstack.1.hook_out']
    """
    index = embed_indices(inputs, positions)

    def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
        value = value.clone()
        value[index] = 0.0
        return value

    return [(f"deepstack.{k}.hook_out", hook) for k in range(n_deepstack)]
