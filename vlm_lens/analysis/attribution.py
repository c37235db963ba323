"""Gradient attributions of a target logit to the visual tokens (at ``hook_image_embeds``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float

from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs

Target = Callable[[torch.Tensor], torch.Tensor]


def logit_target(token: int, position: int = -1, batch: int = 0) -> Target:
    """A scalar target: the logit of ``token`` at ``position`` of batch row ``batch``."""
    return lambda logits: logits[batch, position, token]


def _run(model: HookedVLM, inputs: VLMInputs, embeds: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = embeds.detach().requires_grad_(True)
    logits = model.run_with_hooks(inputs, fwd_hooks=[("hook_image_embeds", lambda v, hook: leaf.reshape(v.shape))])
    value = target(logits)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def image_token_attribution(model: HookedVLM, inputs: VLMInputs, target: Target, *,
                            method: Literal["grad_x_input", "integrated_gradients"] = "grad_x_input",
                            baseline: torch.Tensor | None = None, steps: int = 32
                            ) -> Float[torch.Tensor, "total_image_tokens"]:
    """Attribution of ``target(logits)`` to each visual token (in sequence order, all images of the
    batch), summed over the embedding dimension.

    ``baseline`` (default zeros; pass a mean visual token for a mean baseline) is broadcast to
    ``hook_image_embeds``. Integrated gradients uses the midpoint rule with ``steps`` points, so its
    attributions add up to ``target(input) - target(baseline)`` up to the discretisation error.
    """
    if inputs.pixel_values is None:
        raise ValueError("attribution to visual tokens needs inputs with images.")
    with torch.no_grad():
        embeds = model.encode_images(inputs.pixel_values, **inputs.extras)
    base = torch.zeros_like(embeds) if baseline is None else baseline.to(embeds).expand_as(embeds)
    with torch.enable_grad():
        if method == "grad_x_input":
            _, grad = _run(model, inputs, embeds, target)
            return ((embeds - base) * grad).sum(-1)
        if method != "integrated_gradients":
            raise ValueError(f"method must be 'grad_x_input' or 'integrated_gradients', got {method!r}.")
        total = torch.zeros_like(embeds)
        for i in range(steps):
            alpha = (i + 0.5) / steps
            _, grad = _run(model, inputs, base + alpha * (embeds - base), target)
            total += grad
    return ((embeds - base) * total / steps).sum(-1)


def top_attributed_positions(inputs: VLMInputs, scores: torch.Tensor, image: int, k: int) -> torch.Tensor:
    """The ``k`` grid positions of image ``image`` with the highest attribution scores."""
    span = inputs.layout.spans[image]
    grid = inputs.layout.grid(image).flatten()
    flat = scores.reshape(-1)
    offset = sum(s.n_embeds for s in inputs.layout.spans[:image])
    values = flat[offset + span.embed_rows(grid)]
    return grid[values.topk(min(k, len(grid))).indices].sort().values
