"""Visual-token ablation: replace chosen image tokens with zeros, a mean token, matched noise or a tensor.

Hooks act on ``hook_image_embeds``, which fires once per image encode: in ``generate`` that is the
prefill only, so ablations are safe there. ``embed_ablation_hooks`` works on ``hook_embed`` for any
absolute position (text too): in ``generate`` each position is replaced in the call that embeds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file

from vlm_lens.analysis.positions import per_row, require_absolute
from vlm_lens.context import CALL
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs

Replacement = Literal["zero", "mean", "noise"] | torch.Tensor
Hook = tuple[str, Callable]


def embed_indices(inputs: VLMInputs, positions: Any) -> torch.Tensor:
    """Rows of the flattened ``hook_image_embeds`` that hold the given sequence positions."""
    rows = per_row(positions, inputs.tokens.shape[0])
    out, offset = [], 0
    for span in inputs.layout.spans:
        pos = rows[span.batch]
        inside = pos[(pos >= span.start) & (pos < span.end) & ~torch.isin(pos, span.text.to(pos.device))]
        out.append(span.embed_rows(inside) + offset)
        offset += span.n_embeds
    for b, pos in enumerate(rows):
        covered = sum(int(((pos >= s.start) & (pos < s.end) & ~torch.isin(pos, s.text.to(pos.device))).sum())
                      for s in inputs.layout.spans if s.batch == b)
        if covered != len(pos.unique()):
            raise ValueError(f"batch row {b}: some positions are not image tokens; use embed_ablation_hooks.")
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _replace(values: torch.Tensor, replacement: Replacement, mean: torch.Tensor | None,
             reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if isinstance(replacement, torch.Tensor):
        return replacement.to(values).expand_as(values)
    if replacement == "zero":
        return torch.zeros_like(values)
    if replacement == "mean":
        if mean is None:
            raise ValueError("replacement='mean' needs mean=...; compute it with mean_visual_token(model, inputs).")
        return mean.to(values).expand_as(values)
    if replacement == "noise":
        mu, sigma = reference.mean(0), reference.std(0)
        noise = torch.randn(values.shape, generator=generator, dtype=torch.float32).to(values)
        return mu + sigma * noise
    raise ValueError(f"unknown replacement {replacement!r}; use 'zero', 'mean', 'noise' or a tensor.")


def image_ablation_hooks(inputs: VLMInputs, positions: Any, replacement: Replacement = "mean", *,
                         mean: torch.Tensor | None = None, seed: int = 0) -> list[Hook]:
    """Hooks that replace the image tokens at ``positions`` (one tensor, or one per batch row).

    Example:
        >>> from vlm_lens.analysis.positions import object_positions
        >>> pos = object_positions(inputs.layout, 0, item.target_mask, buffer=1)  # the asked-about object
        >>> hooks = image_ablation_hooks(inputs, pos, "mean", mean=mean_visual_token(model, inputs))
        >>> ablated = model.run_with_hooks(inputs, fwd_hooks=hooks)
        >>> model.to_string(logits[0, -1].argmax()), model.to_string(ablated[0, -1].argmax())
        ('blue', 'red')
    """
    index = embed_indices(inputs, positions)
    generator = torch.Generator().manual_seed(seed)

    def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = value.reshape(-1, value.shape[-1]).clone()
        flat[index] = _replace(flat[index], replacement, mean, flat, generator)
        return flat.reshape(value.shape)

    return [("hook_image_embeds", hook)]


def embed_ablation_hooks(positions: Any, replacement: Replacement = "zero", *, mean: torch.Tensor | None = None,
                         seed: int = 0, inputs: VLMInputs | None = None) -> list[Hook]:
    """Hooks on ``hook_embed`` replacing any sequence positions (text or image tokens).

    Positions are absolute, >= 0 (one tensor for every row, or a list with one per row). Each
    call replaces those of its own positions (in ``generate`` with the KV cache, a step's new tokens sit after
    the cached ones, so prompt positions are replaced once, at the prefill, and a listed generated position on
    its step); positions past the end of a call are skipped. ``"noise"`` is matched to the mean and std of
    each row's prompt embeddings, padding left out, so it needs ``inputs`` (the prompt these hooks run on).
    """
    require_absolute(positions, "positions")
    if isinstance(replacement, str) and replacement == "noise" and inputs is None:
        raise ValueError("replacement='noise' is matched to each row's own prompt embeddings with the padding left "
                         "out: pass inputs=... (the VLMInputs the hooks run on).")
    generator = torch.Generator().manual_seed(seed)
    reference: list[torch.Tensor] = []  # per row: the prompt's attended embeddings, from the call at offset 0

    def hook(value: torch.Tensor, hook: Any) -> torch.Tensor:
        call = CALL.get()
        offset = 0 if call is None else call.offset
        if replacement == "noise" and offset == 0:
            reference[:] = _prompt_rows(value, inputs)
        value = value.clone()
        for b, pos in enumerate(per_row(positions, value.shape[0])):
            pos = pos[(pos >= offset) & (pos < offset + value.shape[1])] - offset
            if len(pos):
                value[b, pos] = _replace(value[b, pos], replacement, mean, reference[b] if reference else value[b],
                                         generator)
        return value

    return [("hook_embed", hook)]


def _prompt_rows(value: torch.Tensor, inputs: VLMInputs) -> list[torch.Tensor]:
    """Each row's embeddings at the prompt positions its attention mask keeps (no padding)."""
    mask = inputs.attention_mask.to(value.device).bool()
    if mask.shape[0] != value.shape[0] or mask.shape[1] > value.shape[1]:
        raise ValueError(f"inputs= has {tuple(mask.shape)} tokens but the hooked call embeds {tuple(value.shape[:2])}: "
                         "pass the VLMInputs the hooks run on.")
    return [value[b, : mask.shape[1]][mask[b]] for b in range(value.shape[0])]


@torch.no_grad()
def mean_visual_token(model: HookedVLM, inputs: VLMInputs | Iterable[VLMInputs]) -> Float[torch.Tensor, "d_model"]:
    """The mean of ``hook_image_embeds`` over every visual token of the given inputs."""
    batches = [inputs] if isinstance(inputs, VLMInputs) else list(inputs)
    total, count = None, 0
    for batch in batches:
        if batch.pixel_values is None:
            continue
        embeds = model.encode_images(batch.pixel_values, **batch.extras).float()
        total = embeds.sum(0) if total is None else total + embeds.sum(0)
        count += embeds.shape[0]
    if not count:
        raise ValueError("no images in the given inputs; cannot compute a mean visual token.")
    return (total / count).to(model.cfg.dtype)


def save_mean(mean: torch.Tensor, path: str | Path) -> None:
    save_file({"mean_visual_token": mean.detach().cpu().contiguous()}, str(path))


def load_mean(path: str | Path) -> torch.Tensor:
    return load_file(str(path))["mean_visual_token"]
