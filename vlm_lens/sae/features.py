"""SAE features over the image: a feature's activation on every patch, as a grid or a heatmap, and the
patches where it is strongest across a set of images.

Works for an SAE at a language-model hook (the image's tokens are read through ``inputs.layout``) and at
a vision-side hook whose tokens are the image's patch grid in row-major order, with or without one
leading CLS token (LLaVA-1.5's tower, ``hook_image_features``, ``hook_image_embeds``). Images are
single-tile, as ``viz.pixels_to_image`` needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from jaxtyping import Float

from vlm_lens import VLMInputs
from vlm_lens.sae._names import is_sequence_hook


@torch.no_grad()
def activation(model: Any, inputs: VLMInputs, hook_name: str) -> torch.Tensor:
    """The activation at one hook point on this input (a forward pass that keeps nothing else)."""
    captured: list[torch.Tensor] = []
    model.run_with_hooks(inputs, fwd_hooks=[(hook_name, lambda act, hook: captured.append(act.detach()))],
                         return_type=None)
    return captured[0]


def _hook_of(sae: Any) -> str:
    return sae.cfg.metadata.hook_name


@torch.no_grad()
def feature_acts(model: Any, inputs: VLMInputs, sae: Any) -> torch.Tensor:
    """The SAE's feature activations at its hook on this input: [batch, pos, d_sae] at a language-model
    hook, [n_images, n_tokens, d_sae] at a vision-side hook.

    Any attached SAEs stay as they are. If ``sae`` itself is attached (with ``HookedSAEVLM.add_sae``), its
    ``hook_sae_acts_post`` is read; otherwise the activation at its hook is encoded.

    Example:
        >>> feature_acts(model, inputs, sae).shape  # [batch, pos, d_sae]
        torch.Size([1, 20, 512])
    """
    name = _hook_of(sae)
    attached = getattr(model, "acts_to_saes", {}).get(name) is sae
    point = f"{name}.hook_sae_acts_post" if attached else name
    if point not in model.hook_dict:
        raise ValueError(f"{name!r} is not a hook point of this model and this SAE is not attached there; "
                         "another SAE may be attached at that hook (model.reset_saes(name) detaches it).")
    act = activation(model, inputs, point)
    acts = act if attached else sae.encode(act.to(sae.device))
    return (acts.to_dense() if acts.is_sparse else acts).float().cpu()


def patch_grid(acts: torch.Tensor, inputs: VLMInputs, hook_name: str,
               image_index: int = 0) -> Float[torch.Tensor, "rows cols d_sae"]:
    """Feature activations (from ``feature_acts``) at image ``image_index``'s patches, as its grid."""
    grid = inputs.layout.grid(image_index)
    if is_sequence_hook(hook_name):
        return acts[inputs.layout.batch_of(image_index)][grid.to(acts.device)]
    rows, cols = grid.shape
    n_images = inputs.layout.n_images
    if acts.ndim != 3 or acts.shape[0] != n_images or acts.shape[1] - rows * cols not in (0, 1):
        raise ValueError(f"the activations at {hook_name!r} have shape {tuple(acts.shape)}, which is not "
                         f"[{n_images} images, {rows}x{cols} patches (+1 CLS), d_sae]; feature maps over the image "
                         "need one tower pass per image with its patches in grid order (single-tile images), "
                         "or an SAE at a language-model hook.")
    tokens = acts[image_index, acts.shape[1] - rows * cols:]
    return tokens.reshape(rows, cols, -1)


def feature_map(model: Any, inputs: VLMInputs, sae: Any, feature: int, image_index: int = 0) -> Float[torch.Tensor, "rows cols"]:
    """Feature ``feature``'s activation on each patch of image ``image_index``, as its [rows, cols] grid.

    Example:
        >>> feature_map(model, inputs, sae, feature=204).shape  # [rows, cols]; 204 is the triangle feature
        torch.Size([3, 3])
    """
    _check_feature(sae, feature)
    return patch_grid(feature_acts(model, inputs, sae), inputs, _hook_of(sae), image_index)[..., feature]


def feature_heatmap(model: Any, inputs: VLMInputs, sae: Any, feature: int, image_index: int = 0,
                    **heatmap_kwargs: Any) -> Any:
    """``feature_map`` drawn over the image the model saw (``viz.image_heatmap``); returns the Figure.

    Example:
        >>> fig = feature_heatmap(model, inputs, sae, feature=204)
        >>> viz.save_figure(fig, "feature204.png").is_file()
        True
    """
    from vlm_lens import viz

    values = feature_map(model, inputs, sae, feature, image_index)
    image = viz.pixels_to_image(model, inputs.pixel_values[image_index],
                                size=model.pipeline.processed_size(inputs.extras, image_index))
    heatmap_kwargs.setdefault("title", f"feature {feature} at {_hook_of(sae)}")
    heatmap_kwargs.setdefault("vmin", 0.0)
    return viz.image_heatmap(image, values, **heatmap_kwargs)


@dataclass(frozen=True)
class PatchHit:
    """One patch where a feature fired: the item's index in the scanned items, the patch cell, the value."""

    index: int
    row: int
    col: int
    activation: float
    grid_shape: tuple[int, int]


@torch.no_grad()
def scan_patches(model: Any, sae: Any, items: Sequence[Any], *, batch_size: int = 32) -> Float[torch.Tensor, "n_items rows cols d_sae"]:
    """All features' activations on every patch of each item's (first) image: [n_items, rows, cols, d_sae].

    ``items`` have ``.prompt`` and ``.image`` (e.g. ``organism.ShapesDataset``); images must share one grid.
    """
    out = []
    iterator = iter(items)
    while batch := list(islice(iterator, batch_size)):
        inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
        acts = feature_acts(model, inputs, sae)
        first = [inputs.layout.images_in_row(b)[0] for b in range(len(batch))]
        out.extend(patch_grid(acts, inputs, _hook_of(sae), i) for i in first)
    shapes = {tuple(g.shape[:2]) for g in out}
    if len(shapes) > 1:
        raise ValueError(f"the items' images have different patch grids {sorted(shapes)}; scan them apart.")
    return torch.stack(out)


def top_patches(model: Any, sae: Any, feature: int, items: Sequence[Any], *, k: int = 12,
                batch_size: int = 32, scan: torch.Tensor | None = None) -> list[PatchHit]:
    """The ``k`` patches (over all items' first images) where ``feature`` is strongest, strongest first;
    patches where it does not fire are left out. Pass ``scan`` (from ``scan_patches``) to reuse a scan.

    Example:
        >>> hits = top_patches(model, sae, 204, items, k=3)  # over the 8 items' images
        >>> len(hits), hits[0].grid_shape  # the strongest first; each has index, row, col, activation
        (3, (3, 3))
    """
    _check_feature(sae, feature)
    if scan is None:
        scan = scan_patches(model, sae, items, batch_size=batch_size)
    values = scan[..., feature]
    n_items, rows, cols = values.shape
    order = values.flatten().argsort(descending=True)[:k]
    hits = []
    for flat in order.tolist():
        value = float(values.flatten()[flat])
        if value <= 0:
            break
        index, rest = divmod(flat, rows * cols)
        hits.append(PatchHit(index, rest // cols, rest % cols, value, (rows, cols)))
    return hits


def _check_feature(sae: Any, feature: int) -> None:
    d_sae = sae.cfg.d_sae
    if not 0 <= feature < d_sae:
        raise ValueError(f"feature {feature} is out of range: this SAE has {d_sae} features (0..{d_sae - 1}).")
