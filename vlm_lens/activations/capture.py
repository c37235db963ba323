"""Forward hooks that keep only the selected rows of each hook point, flattened to [n_rows, d].

Two kinds of hook point:

- sequence hooks (the language model: ``hook_embed``, ``blocks.*``, ``ln_final.*``): [batch, pos, ...],
  indexed at (batch row, position) of each kept row;
- image-token hooks (the vision side, e.g. ``hook_image_embeds``, ``hook_image_features``,
  ``projector.hook_*``): one row per image token in sequence order, as [n_images, n_tokens, ...] or
  [total_image_tokens, ...]; only kept rows that are image tokens can be read there. Vision-tower hooks
  with a class token or another token count than the sequence has no row order in the sequence and
  are refused with the shapes involved.

Attention patterns and scores ([batch, head, query, key]) have no fixed row width and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from vlm_lens.activations.positions import Selection
from vlm_lens.hook_names import is_sequence_hook

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def check_hooks(model: Any, hooks: Sequence[str]) -> list[str]:
    if isinstance(hooks, str) or not hooks:
        raise ValueError(f"hooks must be a non-empty list of hook names, got {hooks!r}; e.g. "
                         "hooks=['blocks.2.hook_resid_post', 'hook_image_embeds'].")
    hooks = list(hooks)
    dupes = sorted({h for h in hooks if hooks.count(h) > 1})
    unknown = [h for h in hooks if h not in model.hook_dict]
    if dupes:
        raise ValueError(f"hooks {dupes} are listed more than once; give each hook once.")
    if unknown:
        close = [n for n in model.hook_dict if any(u.split(".")[-1] == n.split(".")[-1] for u in unknown)][:6]
        raise ValueError(f"hooks {unknown} are not hook points of this model; similar names: {close}. "
                         "See model.hook_dict for all of them.")
    key_axis = [h for h in hooks if any(part in h for part in model.pipeline.key_axis_hooks)]
    if key_axis:
        raise ValueError(f"hooks {key_axis} are [batch, image_keys, ...] (cross-attention keys and values): their rows "
                         "are image keys, not sequence positions. Read them with run_with_cache.")
    image_side = [h for h in hooks if not is_sequence_hook(h)]
    if image_side and not model.pipeline.splices_images:
        raise ValueError(f"hooks {image_side} are image-side, and this model reads its images through cross-attention: "
                         "no sequence position holds their rows. Read them with run_with_cache.")
    pairwise = [h for h in hooks if h.endswith(("hook_pattern", "hook_attn_scores"))]
    if pairwise:
        raise ValueError(f"hooks {pairwise} are [batch, head, query, key]: their rows have no fixed width. Extract "
                         "hook_q / hook_k (or hook_z) and compute attention from them.")
    return hooks


def stop_layer(model: Any, hooks: Sequence[str]) -> int | None:
    """The block after the deepest one a hook sits in (the forward stops there), or None for the full pass."""
    layers = []
    for name in hooks:
        match = _LAYER.match(name)
        if name.startswith("ln_final."):
            return None  # after the last block: the whole language model runs
        layers.append(int(match.group(1)) if match else -1)  # embedding or vision side: no block needed
    stop = max(layers) + 1
    return None if stop >= model.cfg.n_layers else stop


class RowCapture:
    """Hooks, attached once for a whole extraction, that hand each hook point's kept rows of the batch
    being run ([n, *rest], on the CPU, in ``dtype``) to that batch's ``buffer.add(name, rows)``.

    Outside ``batch(...)`` the hooks do nothing, so a forward pass of the user's own (e.g. inside a
    positions function) is not captured.
    """

    def __init__(self, hooks: Sequence[str], dtype: torch.dtype | None):
        self.names, self.dtype = list(hooks), dtype
        self._state: dict[str, Any] | None = None

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        return [(name, self._sequence_hook if is_sequence_hook(name) else self._image_hook) for name in self.names]

    @contextmanager
    def batch(self, selection: Selection, image_mask: torch.Tensor, buffer: Any,
              image_tokens: Sequence[int]) -> Iterator[None]:
        """Capture the kept rows of ``selection`` (``image_mask``: the batch's, on the CPU; ``image_tokens``: each
        image's number of embedded tokens, in sequence order) while inside; afterwards, check every hook fired once
        (an image-token hook may stay silent where no row is kept)."""
        check_image_rows(self.names, selection, image_mask)
        image_index = (image_mask.reshape(-1).long().cumsum(0) - 1).view(image_mask.shape)  # among image tokens
        self._state = {"buffer": buffer, "n_image_tokens": int(image_mask.sum()), "moved": {},
                       "image_tokens": list(image_tokens),
                       "index": {"sequence": (selection.batch, selection.seq),
                                 "image": (image_index[selection.batch, selection.seq],)}}
        before = {h: len(buffer.parts[h]) for h in self.names}
        try:
            yield
        finally:
            self._state = None
        check_fired(self.names, buffer.parts, before, selection.n)

    def _index(self, kind: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        moved = self._state["moved"]
        if (kind, device) not in moved:  # indices move to the activations' device once per batch
            moved[kind, device] = tuple(t.to(device) for t in self._state["index"][kind])
        return moved[kind, device]

    def _keep(self, name: str, rows: torch.Tensor) -> None:
        self._state["buffer"].add(name, rows.detach().to("cpu", self.dtype or rows.dtype))

    def _sequence_hook(self, act: torch.Tensor, hook: Any) -> None:
        if self._state is not None:
            self._keep(hook.name, act[self._index("sequence", act.device)])

    def _image_hook(self, act: torch.Tensor, hook: Any) -> None:
        if self._state is None:
            return
        n_image_tokens, per_image = self._state["n_image_tokens"], self._state["image_tokens"]
        # Rows in sequence order: [total_image_tokens, ...] (e.g. a merger's [tokens, patches merged, d]), or
        # [n_images, tokens, ...] with each image's token count (a tiled tower's [n_tiles, patches, d] can match
        # the total alone, in another order: refused).
        if act.shape[0] == n_image_tokens:
            flat = act
        elif act.ndim >= 3 and act.shape[0] == len(per_image) and all(n == act.shape[1] for n in per_image):
            flat = act.flatten(0, 1)
        else:
            raise ValueError(
                f"hook {hook.name!r} has shape {tuple(act.shape)}, which does not give one row per image token "
                f"(this batch has {n_image_tokens}), so its rows have no sequence position. Extract "
                "hook_image_embeds (or hook_image_features where it has one row per image token) instead."
            )
        self._keep(hook.name, flat[self._index("image", act.device)])


def check_fired(hooks: Sequence[str], store: dict[str, list[torch.Tensor]], before: dict[str, int], n_rows: int) -> None:
    """Every hook fired once in the pass; an image-token hook may stay silent where no row was kept."""
    for name in hooks:
        fired = len(store[name]) - before[name]
        if fired == 1 or (fired == 0 and n_rows == 0 and not is_sequence_hook(name)):
            continue
        why = ("did not fire: optional TransformerLens hooks need switching on, e.g. model.set_use_attn_result(True)"
               if fired == 0 else f"fired {fired} times in one forward pass")
        raise ValueError(f"hook {name!r} {why}.")


def check_image_rows(hooks: Sequence[str], selection: Selection, image_mask: torch.Tensor) -> None:
    """Image-token hooks have rows at image tokens only: refuse kept rows elsewhere before anything runs."""
    image_hooks = [h for h in hooks if not is_sequence_hook(h)]
    if image_hooks and selection.n and not bool(image_mask[selection.batch, selection.seq].all()):
        raise ValueError(
            f"hooks {image_hooks} have rows for image tokens only, but the positions kept include text tokens. "
            "Use positions='image' (or a function returning image positions), or extract language-model hooks only."
        )
