"""Input-agnostic ("artifact") keys: image positions whose key barely changes across images.

``find_input_agnostic_keys`` flags, per layer, the grid cells whose key variance across many images
is a small fraction of the layer's typical (median) cell variance. ``artifact_knockout`` then blocks
attention from text positions to those keys (``knockout_hooks``), so ``evaluate`` or a probe can
test whether perception needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int

from vlm_lens.analysis.knockout import knockout_hooks
from vlm_lens.inputs import VLMInputs
from vlm_lens.layout import ImageLayout


@dataclass(frozen=True)
class InputAgnosticKeys:
    """Per layer and grid cell: key variance across images, its ratio to the layer's median, the flags."""

    layers: tuple[int, ...]
    variance: Float[torch.Tensor, "n_layers rows cols"]
    ratio: Float[torch.Tensor, "n_layers rows cols"]
    mask: Bool[torch.Tensor, "n_layers rows cols"]
    threshold: float

    def cells(self, layer: int) -> Bool[torch.Tensor, "rows cols"]:
        """Flagged cells of ``layer`` (a model layer index, one of ``layers``)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not analysed; layers are {self.layers}.")
        return self.mask[self.layers.index(layer)]

    def positions(self, layout: ImageLayout, image: int, layer: int) -> Int[torch.Tensor, " n"]:
        """Sequence positions of the flagged keys of ``layer`` in image ``image``."""
        return layout.mask_to_positions(image, self.cells(layer))

    def __repr__(self) -> str:
        counts = ", ".join(f"L{layer}: {int(m.sum())}" for layer, m in zip(self.layers, self.mask))
        return f"InputAgnosticKeys(threshold={self.threshold}, flagged cells per layer: {counts})"


def find_input_agnostic_keys(keys: Float[torch.Tensor, "n_layers n_images rows cols dim"], *,
                             layers: Sequence[int] | None = None, threshold: float = 0.1) -> InputAgnosticKeys:
    """Flag cells whose key variance across images is below ``threshold`` x the layer's median.

    ``keys`` is e.g. ``readout.stack("k")`` over many images (pre-rotary keys: rotary only depends
    on position, so either works; ``"rot_k"`` is what attention sees). Variance is the trace of the
    covariance across images (summed over the key dimensions, all KV heads unless one is chosen).

    Example:
        >>> found = find_input_agnostic_keys(readout.stack("k"), layers=readout.layers)
        >>> found
        InputAgnosticKeys(threshold=0.1, flagged cells per layer: L0: ..., L1: ..., L2: ..., L3: ...)
        >>> found.cells(2).shape  # bool [rows, cols]
        torch.Size([3, 3])
    """
    if keys.ndim != 5 or keys.shape[1] < 2:
        raise ValueError(f"keys must be [n_layers, n_images >= 2, rows, cols, dim], got {tuple(keys.shape)}; "
                         "variance across images needs several images.")
    if threshold <= 0:
        raise ValueError(f"threshold is a fraction of the median variance and must be > 0, got {threshold}.")
    layers = tuple(range(len(keys))) if layers is None else tuple(layers)
    if len(layers) != len(keys):
        raise ValueError(f"{len(layers)} layer indices for {len(keys)} layers of keys.")
    variance = keys.float().var(dim=1, unbiased=True).sum(-1)  # [L, rows, cols]
    median = variance.flatten(1).median(1).values.clamp(min=1e-12)[:, None, None]
    ratio = variance / median
    return InputAgnosticKeys(layers, variance, ratio, ratio < threshold, float(threshold))


def _text_positions(inputs: VLMInputs, row: int) -> torch.Tensor:
    keep = (~inputs.image_mask[row]) & (inputs.attention_mask[row] > 0)
    return keep.nonzero().flatten().cpu()


def artifact_knockout(found: InputAgnosticKeys, *, layers: Sequence[int] | None = None,
                      queries: Literal["text", "all"] = "text") -> Callable[[VLMInputs, Sequence[Any]], list]:
    """A hook factory ``(inputs, items) -> hooks`` (for ``evaluate``/``compare``/``read_kv``) that blocks
    attention from text positions (``queries="all"``: every position) to the flagged keys, each
    layer at its own flagged cells. ``layers`` restricts to some of the analysed layers.

    Example:
        >>> from vlm_lens.analysis.evaluate import compare
        >>> found = find_input_agnostic_keys(readout.stack("k"), layers=readout.layers)
        >>> compare(model, items, artifact_knockout(found))["accuracy_drop"]  # the organism needs none
        0.0
    """
    if queries not in ("text", "all"):
        raise ValueError(f"queries must be 'text' or 'all', got {queries!r}.")
    chosen = found.layers if layers is None else tuple(layers)
    missing = [x for x in chosen if x not in found.layers]
    if missing:
        raise ValueError(f"layer(s) {missing} were not analysed; choose from {found.layers}.")

    def factory(inputs: VLMInputs, items: Sequence[Any] = ()) -> list:
        batch, layout = inputs.tokens.shape[0], inputs.layout
        n_pos = inputs.tokens.shape[1]
        query_rows = [_text_positions(inputs, b) if queries == "text" else torch.arange(n_pos) for b in range(batch)]
        hooks = []
        for layer in chosen:
            cells = found.cells(layer)
            if not cells.any():
                continue
            key_rows = [torch.cat([torch.zeros(0, dtype=torch.long)]
                                  + [found.positions(layout, i, layer) for i in layout.images_in_row(b)])
                        for b in range(batch)]
            hooks.extend(knockout_hooks(query_rows, key_rows, [layer]))
        return hooks

    return factory
