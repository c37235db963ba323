"""Readout of image keys, values and vision-side features, laid out on each image's patch grid.

Capture hooks gather only the image grid positions inside the forward pass (nothing else is kept),
and the pass stops after the last layer asked for, so a large model's readout over many images
fits in memory; ``iter_layers`` goes one layer at a time for the largest jobs.

Sites (TransformerLens hook names, see ``SITES``):

- ``"k"``: keys **before** rotary, ``blocks.{l}.attn.hook_k`` [batch, pos, n_kv_heads, d_head]
- ``"rot_k"``: keys **after** rotary, ``blocks.{l}.attn.hook_rot_k`` (rotary models only)
- ``"v"``: values, ``blocks.{l}.attn.hook_v``
- ``"image_features"``: vision features entering the projector (``hook_image_features``)
- ``"image_embeds"``: projector output spliced into the sequence (``hook_image_embeds``)

With grouped-query attention the LM sites have ``n_kv_heads`` heads, fewer than the query heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs
from vlm_lens.layout import ImageLayout

SITES = {
    "k": "blocks.{layer}.attn.hook_k",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "v": "blocks.{layer}.attn.hook_v",
    "image_features": "hook_image_features",
    "image_embeds": "hook_image_embeds",
}
LM_SITES = ("k", "rot_k", "v")
VISION_SITES = ("image_features", "image_embeds")
SITE_NOTES = {
    "k": "keys before rotary (blocks.{layer}.attn.hook_k)",
    "rot_k": "keys after rotary (blocks.{layer}.attn.hook_rot_k)",
    "v": "values (blocks.{layer}.attn.hook_v)",
    "image_features": "vision features that enter the projector (hook_image_features)",
    "image_embeds": "projector output spliced into the sequence (hook_image_embeds)",
}

HookList = list[tuple[str, Callable]]
Hooks = HookList | Callable[[VLMInputs, Sequence[Any]], HookList] | None


@dataclass(frozen=True)
class KVReadout:
    """Features read at image grid cells (or at a text's last token, see ``text_features``).

    ``data[(site, layer)]`` is [n, *cells, n_kv_heads, d_head] for LM sites and [n, *cells, dim] for
    vision sites (stored under layer ``None``); ``cells`` is (rows, cols) for images, () for texts.
    ``notes`` says what each site is, e.g. that ``"k"`` is before rotary and ``"rot_k"`` after.

    Example:
        >>> readout = read_kv(model, inputs, layers=[0, 1])
        >>> readout.stack("v").shape  # [n_layers, n_images, rows, cols, n_kv_heads * d_head]
        torch.Size([2, 1, 3, 3, 64])
    """

    data: dict[tuple[str, int | None], torch.Tensor]
    layers: tuple[int, ...]
    sites: tuple[str, ...]
    notes: dict[str, str]

    @property
    def n(self) -> int:
        return next(iter(self.data.values())).shape[0]

    def _key(self, site: str, layer: int | None) -> tuple[str, int | None]:
        if site not in self.sites:
            raise ValueError(f"site {site!r} was not read; this readout has {self.sites}. Pass sites=... to read it.")
        key = (site, None if site in VISION_SITES else layer)
        if key not in self.data:
            raise ValueError(f"layer {layer} was not read for site {site!r}; read layers are {self.layers}.")
        return key

    def features(self, site: str, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """[n, *cells, dim] of one site and layer; LM heads are concatenated unless ``head`` picks one."""
        x = self.data[self._key(site, layer)]
        if site in VISION_SITES:
            if head is not None:
                raise ValueError(f"site {site!r} has no heads; drop head={head}.")
            return x
        if head is None:
            return x.flatten(-2)
        if not 0 <= head < x.shape[-2]:
            raise ValueError(f"head {head} out of range: site {site!r} has {x.shape[-2]} key/value heads.")
        return x[..., head, :]

    def stack(self, site: str, head: int | None = None) -> Float[torch.Tensor, "n_layers n *cells dim"]:
        """All read layers of ``site`` stacked: [n_layers, n, *cells, dim] (n_layers = 1 for vision sites)."""
        layers = [None] if site in VISION_SITES else list(self.layers)
        return torch.stack([self.features(site, layer, head) for layer in layers])


def _check_sites(model: HookedVLM, sites: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"unknown site(s) {unknown}; choose from {list(SITES)}.")
    if "rot_k" in sites and model.cfg.positional_embedding_type != "rotary":
        raise ValueError(f"site 'rot_k' needs a rotary model; this one uses {model.cfg.positional_embedding_type!r}. "
                         "Read 'k' instead.")
    return tuple(sites)


def _check_layers(model: HookedVLM, layers: Sequence[int] | None) -> tuple[int, ...]:
    n_layers = model.cfg.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range for a model with {n_layers} layers.")
    return layers


def grid_index(layout: ImageLayout) -> tuple[Int[torch.Tensor, " n_images"], Int[torch.Tensor, "n_images rows cols"]]:
    """(batch row, grid positions) of every image in ``layout``; all images must share one grid shape."""
    if layout.n_images == 0:
        raise ValueError("these inputs hold no image; build them with model.prepare(prompt, images=[...]).")
    layout.require_sequence_axis("read_kv")
    shapes = {tuple(s.grid.shape) for s in layout.spans}
    if len(shapes) != 1:
        raise ValueError(f"images have different grid shapes {sorted(shapes)}; read them in separate calls.")
    batch = torch.tensor([s.batch for s in layout.spans])
    return batch, torch.stack([s.grid for s in layout.spans])


def _token_index(layout: ImageLayout, flat: bool) -> torch.Tensor:
    """Index of each grid cell into the per-image (or, ``flat``, concatenated) image-token tensor."""
    offsets = torch.tensor([0] + [s.n_embeds for s in layout.spans]).cumsum(0)[:-1]
    local = torch.stack([s.embed_rows(s.grid) for s in layout.spans])
    return local + offsets[:, None, None] if flat else local


def _capture_hooks(model: HookedVLM, layout: ImageLayout, sites: Sequence[str], layers: Sequence[int],
                   store: dict, dtype: torch.dtype) -> HookList:
    batch, grid = grid_index(layout)
    device = model.cfg.device

    def keep(key: tuple, x: torch.Tensor) -> None:
        store.setdefault(key, []).append(x.detach().to("cpu", dtype))

    def lm_hook(key: tuple) -> Callable:
        b, g = batch[:, None, None].to(device), grid.to(device)
        return lambda act, hook: keep(key, act[b, g])

    n_tokens = [s.n_embeds for s in layout.spans]

    def vision_hook(key: tuple) -> Callable:
        def hook(act: torch.Tensor, hook: Any) -> None:
            rows = (act.shape[0],) if act.ndim == 2 else tuple(act.shape[:2])
            expected = (sum(n_tokens),) if act.ndim == 2 else (len(n_tokens), max(n_tokens))
            if rows != expected:
                raise ValueError(
                    f"{hook.name} has {list(rows)} rows but the images hold {n_tokens} tokens: this model's "
                    f"projector pools or merges the features, so site {key[0]!r} has no row per image token. "
                    "Read site 'image_embeds' instead.")
            if act.ndim == 2:  # [total_image_tokens, d]: images of different token counts
                keep(key, act[_token_index(layout, flat=True).to(act.device)])
            else:
                idx = _token_index(layout, flat=False).to(act.device)
                keep(key, act[torch.arange(len(idx), device=act.device)[:, None, None], idx])
        return hook

    hooks = []
    for site in sites:
        if site in VISION_SITES:
            hooks.append((SITES[site], vision_hook((site, None))))
        else:
            hooks.extend((SITES[site].format(layer=layer), lm_hook((site, layer))) for layer in layers)
    return hooks


def _as_batches(inputs: VLMInputs | Iterable[VLMInputs]) -> Iterable[VLMInputs]:
    return [inputs] if isinstance(inputs, VLMInputs) else inputs


@torch.no_grad()
def read_kv(model: HookedVLM, inputs: VLMInputs | Iterable[VLMInputs], *, layers: Sequence[int] | None = None,
            sites: Sequence[str] = ("k", "rot_k", "v", "image_features", "image_embeds"),
            fwd_hooks: Hooks = None, dtype: torch.dtype = torch.float32, progress: bool = False) -> KVReadout:
    """Read ``sites`` at the image grid cells of every image in ``inputs`` (one ``VLMInputs`` or batches).

    Images are numbered in batch order, then sequence order. ``fwd_hooks`` (a list, or a function
    ``(inputs, items) -> hooks`` as in ``evaluate``, called with no items) run before the readout, so
    the features are read under an intervention. The pass stops after the last layer read.

    Example:
        >>> from vlm_lens.analysis.probing import prepare_batches
        >>> batches = prepare_batches(model, items, batch_size=4)  # 8 items
        >>> readout = read_kv(model, batches, layers=[0, 1], sites=("v",))
        >>> readout.features("v", 1).shape  # [n_images, rows, cols, n_kv_heads * d_head]
        torch.Size([8, 3, 3, 64])
    """
    sites, layers = _check_sites(model, sites), _check_layers(model, layers)
    lm = any(s in LM_SITES for s in sites)
    stop = max(layers) + 1 if lm and layers else 0
    if lm and not layers:
        raise ValueError("layers is empty; give at least one layer or read vision sites only.")
    store: dict = {}
    for batch in tqdm(_as_batches(inputs), disable=not progress, desc="read_kv"):
        if not isinstance(batch, VLMInputs):
            raise ValueError(f"inputs must be VLMInputs (from model.prepare), got {type(batch).__name__}.")
        extra = fwd_hooks(batch, ()) if callable(fwd_hooks) else list(fwd_hooks or [])
        capture = _capture_hooks(model, batch.layout, sites, layers if lm else (), store, dtype)
        model.run_with_hooks(batch, fwd_hooks=extra + capture, stop_at_layer=stop)
    if not store:
        raise ValueError("inputs held no batch; pass a VLMInputs or a non-empty list of them.")
    data = {key: torch.cat(parts) for key, parts in store.items()}
    return KVReadout(data, layers if lm else (), sites, {s: SITE_NOTES[s] for s in sites})


def iter_layers(model: HookedVLM, inputs: VLMInputs | Iterable[VLMInputs], *, layers: Sequence[int] | None = None,
                sites: Sequence[str] = ("k", "rot_k", "v"), **kwargs: Any) -> Iterator[tuple[int, KVReadout]]:
    """Yield ``(layer, readout)`` one layer at a time, over all of ``inputs`` (one or more batches).

    Memory holds one layer's features only; each layer costs a forward pass up to that layer.
    """
    if any(s in VISION_SITES for s in sites):
        raise ValueError("iter_layers reads LM sites only; read vision sites once with read_kv(sites=...).")
    inputs = [inputs] if isinstance(inputs, VLMInputs) else list(inputs)  # re-read once per layer
    for layer in _check_layers(model, layers):
        yield layer, read_kv(model, inputs, layers=[layer], sites=sites, **kwargs)


@torch.no_grad()
def text_features(model: HookedVLM, texts: Sequence[str], *, layers: Sequence[int] | None = None,
                  sites: Sequence[str] = ("k", "v"), template: str = "{text}",
                  dtype: torch.dtype = torch.float32) -> KVReadout:
    """Keys/values of each text query at its last token, run through the LM alone (no image).

    ``template`` wraps each text (e.g. ``"USER: {text}"``); the result has no cells: ``stack(site)``
    is [n_layers, n_texts, dim], to compare with image features of the same site and layer.
    """
    sites, layers = _check_sites(model, sites), _check_layers(model, layers)
    if any(s in VISION_SITES for s in sites) or not layers:
        raise ValueError(f"text queries have LM sites only ({LM_SITES}) and need at least one layer.")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings, e.g. ['red circle'].")
    store: dict = {}
    names = {SITES[s].format(layer=layer): (s, layer) for s in sites for layer in layers}
    for text in texts:
        tokens = model.to_tokens(template.format(text=text))
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1)
        for name, key in names.items():
            store.setdefault(key, []).append(cache[name][0, -1].to("cpu", dtype))
    data = {key: torch.stack(parts) for key, parts in store.items()}
    return KVReadout(data, layers, sites, {s: SITE_NOTES[s] for s in sites})
