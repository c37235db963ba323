"""Activation patching between images (or prompts), per layer and per image position.

Built on ``transformer_lens.patching.generic_activation_patch`` with an explicit index of
(layer, position[, head]) rows, so only image positions are patched; results come back on the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from transformer_lens import patching

from vlm_lens.hook_names import act_names
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs

Activation = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]


@dataclass(frozen=True)
class GridPatchingResult:
    """``values`` is [n_layers, rows, cols] (or [n_layers, rows, cols, n_heads] for ``z``)."""

    activation: str
    layers: list[int]
    values: torch.Tensor


def logit_diff_metric(correct: int, incorrect: int, position: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: (logits[:, position, correct] - logits[:, position, incorrect]).mean()


def answer_prob_metric(answer: int, position: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: logits[:, position].float().softmax(-1)[:, answer].mean()


def normalised(metric: Callable, clean_value: float, corrupted_value: float) -> Callable:
    """Rescale so the corrupted run scores 0 and the clean run 1."""
    span = clean_value - corrupted_value
    if abs(span) < 1e-12:
        raise ValueError("clean and corrupted runs give the same metric; nothing to normalise.")
    return lambda logits: (metric(logits) - corrupted_value) / span


@torch.no_grad()
def patch_image_positions(model: HookedVLM, clean: VLMInputs, corrupted: VLMInputs, metric: Callable, *,
                          activation: Activation = "resid_pre", image: int = 0, layers: list[int] | None = None,
                          clean_cache: Any = None) -> GridPatchingResult:
    """Patch the clean activation into the corrupted run at each (layer, image position) and score it.

    The two inputs must have the same token layout (same prompt, images of the same size). ``image`` counts
    the images of a row: in a batch, cell (r, c) is patched at every row's own ``image``-th image (rows may sit
    at different positions under padding; their grids must have the same shape), and ``metric`` sees the
    whole batch.
    """
    if clean.layout.axis == "keys":
        raise ValueError("this model reads images through cross-attention: its image positions are keys, not "
                         "sequence positions; patch the keys with the family's own tool (patch_image_keys in its architectures/<family>/analysis.py).")
    if clean.tokens.shape != corrupted.tokens.shape or not torch.equal(clean.image_mask, corrupted.image_mask):
        raise ValueError("clean and corrupted inputs must have the same shape and image positions.")
    grids = _row_grids(clean.layout, image, clean.tokens.shape[0])
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if clean_cache is None:
        names = set(act_names(activation, layers))
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    cells = range(grids[0].numel())
    rows = [(layer, cell) for layer in layers for cell in cells]
    if activation == "z":
        rows = [(layer, cell, head) for layer, cell in rows for head in range(model.cfg.n_heads)]
        shape = (len(layers), *grids[0].shape, model.cfg.n_heads)
    else:
        shape = (len(layers), *grids[0].shape)
    df = pd.DataFrame(rows, columns=["layer", "pos", "head_index"][: len(rows[0])])
    flat = patching.generic_activation_patch(model, corrupted, clean_cache, metric,
                                             patch_setter=_cell_setter(grids.flatten(1)),
                                             activation_name=activation, index_df=df)
    return GridPatchingResult(activation, layers, flat.reshape(shape))


def _row_grids(layout: Any, image: int, batch: int) -> torch.Tensor:
    """[batch, rows, cols]: the sequence positions of each row's ``image``-th image's grid."""
    grids = []
    for b in range(batch):
        in_row = layout.images_in_row(b)
        if not 0 <= image < len(in_row):
            raise ValueError(f"image={image}: batch row {b} has {len(in_row)} image(s); image counts the images of "
                             "each row (0 is a row's first).")
        grids.append(layout.grid(in_row[image]))
    if any(g.shape != grids[0].shape for g in grids):
        raise ValueError(f"the rows' image {image} grids differ in shape ({[tuple(g.shape) for g in grids]}); patch "
                         "rows with images of one size together.")
    return torch.stack(grids)


def _cell_setter(positions: torch.Tensor) -> Callable:
    """TransformerLens patch setter for index rows (layer, cell[, head]): each batch row at its own position of
    the cell (``positions`` [batch, cells])."""

    def setter(corrupted: torch.Tensor, index: list, clean: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(corrupted.shape[0], device=corrupted.device)
        pos = positions[:, int(index[1])].to(corrupted.device)
        if len(index) == 3:
            corrupted[rows, pos, int(index[2])] = clean[rows, pos, int(index[2])]
        else:
            corrupted[rows, pos] = clean[rows, pos]
        return corrupted

    return setter
