"""LLaVA-OneVision's image path: LLaVA-NeXT's, with ``anyres_max_N`` downsampling and multi-image samples."""

from __future__ import annotations

from typing import Any

import torch

from vlm_lens.architectures.llava_next.pipeline import AnyResPipeline


class AnyResMaxPipeline(AnyResPipeline):
    """LLaVA-OneVision: LLaVA-NeXT's tiling, crop grids above ``anyres_max_N`` tiles downsampled, and
    images of multi-image samples (``batch_num_images`` > 1) kept as one padded tile plus one newline."""

    extra_keys: tuple[str, ...] = ("image_sizes", "batch_num_images")

    def _tiled(self, extras: dict[str, Any], n_images: int) -> list[bool]:
        counts = extras.get("batch_num_images")
        if counts is None:
            return [True] * n_images
        counts = [int(c) for c in torch.as_tensor(counts).flatten().tolist()]
        if sum(counts) != n_images:
            raise ValueError(f"batch_num_images {counts} adds up to {sum(counts)} images, but image_sizes "
                             f"describes {n_images}; pass both from the same processor call.")
        return [c == 1 for c in counts for _ in range(c)]
