"""The analysis tools on cross-attention keys.

- Ablation needs nothing new: ``vlm_lens.analysis.image_ablation_hooks(inputs, positions, ...)`` replaces rows of
  ``hook_image_embeds`` (the projector's output), and Mllama's layout puts each image on its row's *key axis*,
  so ``positions`` are keys (``inputs.layout.grid(i)``) and every cross-attention layer reads the ablated value.
- ``cross_knockout_hooks``: text queries stop reading chosen image keys in chosen cross-attention blocks.
- ``cross_kv``: the keys and values of a cross-attention block (what probes of image keys/values read).
- ``patch_image_keys``: activation patching on the key axis (``vlm_lens.analysis.patch_image_positions`` patches
  sequence positions, where Mllama has no image): the clean run's key and value at one grid key, in one
  cross-attention block, go into the corrupted run; ``key_patch_hooks`` patches any set of keys and blocks.

Logit lens: the residual stream holds text positions only; ``vlm_lens.analysis.logit_lens`` with text
``positions`` reads what the text positions predict after each block, cross-attention blocks included (their
``hook_resid_post``): how reading the image changes the prediction, not what an image token "means".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float

from vlm_lens.analysis.patching import GridPatchingResult
from vlm_lens.analysis.positions import per_row
from vlm_lens.hook_names import cross_attn_name


def cross_knockout_hooks(query_positions: Any, key_positions: Any, layers: Sequence[int]
                         ) -> list[tuple[str, Callable]]:
    """Hooks on ``blocks.{l}.cross_attn.hook_attn_scores`` masking (query, key) pairs: ``query_positions`` are
    sequence positions, ``key_positions`` keys of the row's key axis (``inputs.layout.grid(i)``); each is one
    tensor for every row or one per row. A query left with no key keeps HF's rule (reads all the row's keys).

    Example (the hook names it makes; run them with ``model.run_with_hooks(inputs, fwd_hooks=hooks)``):
        >>> hooks = cross_knockout_hooks([5], torch.arange(4), layers=[3, 8])
        >>> [name for name, _ in hooks]
        ['blocks.3.cross_attn.hook_attn_scores', 'blocks.8.cross_attn.hook_attn_scores']
    """
    def hook(scores: torch.Tensor, hook: Any) -> torch.Tensor:
        batch = scores.shape[0]
        scores = scores.clone()
        low = torch.finfo(scores.dtype).min
        for b, (q, k) in enumerate(zip(per_row(query_positions, batch), per_row(key_positions, batch))):
            q, k = q.to(scores.device), k.to(scores.device)
            q = q[q < scores.shape[2]]  # a generate step holds the new positions only
            if len(q) and len(k):
                scores[b, :, q[:, None], k[None, :]] = low
        return scores

    return [(cross_attn_name("attn_scores", layer), hook) for layer in layers]


def cross_kv(model: Any, inputs: Any, layer: int) -> tuple[Float[torch.Tensor, "batch keys kv_head d_head"],
                                                          Float[torch.Tensor, "batch keys kv_head d_head"]]:
    """Keys (after ``k_norm``) and values of cross-attention block ``layer``, on each row's key axis."""
    if layer not in model.vlm_cfg.cross_attention_layers:
        raise ValueError(f"block {layer} is not a cross-attention block; Mllama's are "
                         f"{list(model.vlm_cfg.cross_attention_layers)}.")
    names = [cross_attn_name("k", layer), cross_attn_name("v", layer)]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda name: name in names)
    if names[0] not in cache:
        raise ValueError("these inputs have no image: there are no cross-attention keys to read.")
    return cache[names[0]], cache[names[1]]


def image_keys(model: Any, inputs: Any, image: int) -> torch.Tensor:
    """Every key of image ``image`` on its row's key axis: its grid, each tile's class token and its padding
    tiles (masked keys), ``keys_per_image`` in all."""
    layout, per_image = inputs.layout, model.vlm_cfg.keys_per_image
    slot = layout.images_in_row(layout.batch_of(image)).index(image)
    return torch.arange(slot * per_image, (slot + 1) * per_image)


def key_patch_hooks(clean_kv: dict[str, torch.Tensor], row: int, keys: Any, layers: Sequence[int]
                    ) -> list[tuple[str, Callable]]:
    """Hooks writing the clean ``hook_k`` / ``hook_v`` (``clean_kv``, by hook name) at ``keys`` of batch row
    ``row`` into a run, in the cross-attention blocks ``layers``.

    Example (the hook names it makes):
        >>> [name for name, _ in key_patch_hooks({}, 0, [5], layers=[3])]
        ['blocks.3.cross_attn.hook_k', 'blocks.3.cross_attn.hook_v']
    """
    keys = torch.as_tensor(keys, dtype=torch.long)

    def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
        value = value.clone()
        value[row, keys.to(value.device)] = clean_kv[hook.name][row, keys.to(value.device)].to(value.dtype)
        return value

    return [(cross_attn_name(name, layer), hook) for layer in layers for name in ("k", "v")]


@torch.no_grad()
def patch_image_keys(model: Any, clean: Any, corrupted: Any, metric: Callable, *, layers: Sequence[int] | None = None,
                     image: int = 0) -> GridPatchingResult:
    """Patch the clean run's key and value at each (cross-attention block, grid key) of image ``image`` into the
    corrupted run and score ``metric(logits)``; ``values`` is [layers, rows, cols] (``activation="kv"``).

    The two inputs must have the same tokens' shape and the image the same tiles (same size); only the
    images may differ. ``layers`` defaults to every cross-attention block.

    Usage (``clean``/``corrupted`` from ``model.prepare`` with two images of one size; the tutorial
    ``tutorials/cross_attention_mllama.md`` runs it)::

        result = patch_image_keys(model, clean, corrupted, lambda logits: logits[0, -1, answer])
        result.values.shape  # [len(cross_attention_layers), rows, cols]
    """
    cross = list(model.vlm_cfg.cross_attention_layers)
    layers = cross if layers is None else list(layers)
    if bad := [layer for layer in layers if layer not in cross]:
        raise ValueError(f"blocks {bad} are not cross-attention blocks; Mllama's are {cross}.")
    if clean.tokens.shape != corrupted.tokens.shape or any(
            not torch.equal(clean.extras[k], corrupted.extras[k]) for k in ("aspect_ratio_ids", "cross_attention_mask")):
        raise ValueError("clean and corrupted inputs must have the same tokens' shape and images of the same "
                         "tiles (resize the corrupted image to the clean one's size).")
    names = {cross_attn_name(name, layer) for layer in layers for name in ("k", "v")}
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
    clean_kv = {name: cache[name] for name in names}
    grid, row = clean.layout.grid(image), clean.layout.batch_of(image)
    values = torch.zeros(len(layers), grid.numel())
    for i, layer in enumerate(layers):
        for j, key in enumerate(grid.flatten().tolist()):
            logits = model.run_with_hooks(corrupted, fwd_hooks=key_patch_hooks(clean_kv, row, [key], [layer]))
            values[i, j] = float(metric(logits))
    values = values.reshape(len(layers), *grid.shape)
    return GridPatchingResult("kv", layers, values)
