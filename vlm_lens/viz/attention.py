"""circuitsvis attention views of one layer of the language model or of the vision tower.

Tokens are labelled readably: the language model's image tokens read ``<img0 r3 c4>`` (from
``model.to_str_tokens``), the vision tower's tokens ``CLS`` and ``r{row} c{col}``. With
``collapse_image=True`` each image span of the language model becomes one pseudo-token ``<img{i}>``, so a
600-token image does not drown the text.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from transformer_lens import ActivationCache

from vlm_lens.hook_names import Tower, act_name
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs


def pattern_hook_name(layer: int, tower: Tower = "lm") -> str:
    """``blocks.{layer}.attn.hook_pattern``, under the ``vision.`` prefix for the vision tower."""
    return act_name("pattern", layer, tower)


def vision_token_labels(model: HookedVLM) -> list[str]:
    """``CLS`` (where the tower has a class token) then ``r{row} c{col}`` over the patch grid."""
    vcfg = model.vlm_cfg.vision
    cells = [f"r{r} c{c}" for r in range(vcfg.grid_size) for c in range(vcfg.grid_size)]
    return (["CLS"] if vcfg.has_class_token else []) + cells


def _n_layers(model: HookedVLM, tower: Tower) -> int:
    return model.cfg.n_layers if tower == "lm" else len(model.vision.blocks)


def _split_inputs(inputs_or_cache: Any, cache: Any) -> tuple[VLMInputs | None, Any]:
    if isinstance(inputs_or_cache, ActivationCache):
        if cache is not None:
            raise ValueError("Pass the cache once: either as the second argument or as cache=..., not both.")
        return None, inputs_or_cache
    if isinstance(inputs_or_cache, VLMInputs):
        return inputs_or_cache, cache
    raise ValueError(
        f"Expected VLMInputs (from model.prepare) or an ActivationCache, got {type(inputs_or_cache).__name__}."
    )


def _collapse_images(inputs: VLMInputs, batch: int, keep: torch.Tensor, pattern: torch.Tensor,
                     labels: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Merge each image span into one pseudo-token: attention summed over its keys, averaged over its
    queries. Rows of the result still sum to one."""
    positions = keep.nonzero().flatten().tolist()
    spans = {i: inputs.layout.spans[i] for i in inputs.layout.images_in_row(batch)}
    groups: list[str] = []
    member = torch.zeros(len(positions), len(positions))  # [groups (<= positions), kept positions]
    current: int | None = None
    for j, pos in enumerate(positions):
        image = next((i for i, s in spans.items() if s.start <= pos < s.end), None)
        if image is None or image != current:
            groups.append(f"<img{image}>" if image is not None else labels[j])
        current = image
        member[len(groups) - 1, j] = 1.0
    member = member[: len(groups)]
    queries = member / member.sum(dim=1, keepdim=True)
    return torch.einsum("gq,hqk,fk->hgf", queries, pattern, member), groups


def attention_view_data(
    model: HookedVLM, inputs_or_cache: Any, layer: int, *, tower: Tower = "lm", collapse_image: bool = False,
    cache: Any = None, batch: int = 0, image_index: int = 0,
) -> tuple[Float[torch.Tensor, "n_heads dest src"], list[str]]:
    """The attention pattern of one layer and its token labels, as the circuitsvis views draw them.

    ``inputs_or_cache`` is the ``VLMInputs`` (needed for the language model's labels), or for
    ``tower="vision"`` an ``ActivationCache`` alone. Without a cache the model runs once, caching only
    this layer's pattern. ``batch`` picks the batch row (``tower="lm"``; padding is dropped) and
    ``image_index`` the vision tower's input (``tower="vision"``): an image, or where the model tiles its
    images (the tiling families) a tile, in the order the processor made them
    (each image's tiles in turn).

    Example:
        >>> pattern, labels = attention_view_data(model, inputs, 0, collapse_image=True)
        >>> pattern.shape, labels[-3:]  # [n_heads, dest, src]: the 9 image tokens are one column, '<img0>'
        (torch.Size([4, 12, 12]), ['<img0>', 'assistant', ':'])
    """
    if tower not in ("lm", "vision"):
        raise ValueError(f"tower must be 'lm' or 'vision', got {tower!r}.")
    inputs, cache = _split_inputs(inputs_or_cache, cache)
    n_layers = _n_layers(model, tower)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the {tower} tower computes {n_layers} layers here.")
    layer = layer % n_layers
    if tower == "lm" and inputs is None:
        raise ValueError("The language model's token labels need the inputs: call "
                         "attention_heads(model, inputs, layer, cache=cache).")
    if tower == "vision" and collapse_image:
        raise ValueError("collapse_image applies to the language model (tower='lm'); the vision tower's "
                         "tokens are all one image.")
    name = pattern_hook_name(layer, tower)
    if cache is None:
        _, cache = model.run_with_cache(inputs, names_filter=name)
    if name not in cache:
        raise ValueError(f"The cache has no {name!r}; run model.run_with_cache(inputs) with a names_filter "
                         "that keeps it.")
    pattern = cache[name].detach().float().cpu()
    if tower == "vision":
        if not 0 <= image_index < pattern.shape[0]:
            raise ValueError(f"image_index {image_index} is out of range: the vision tower ran on "
                             f"{pattern.shape[0]} input(s) (images, or tiles where the model tiles images).")
        labels = vision_token_labels(model)
        if len(labels) != pattern.shape[-1]:
            raise ValueError(f"The vision pattern covers {pattern.shape[-1]} tokens, but the tower's grid "
                             f"gives {len(labels)} labels.")
        return pattern[image_index], labels
    if not 0 <= batch < pattern.shape[0]:
        raise ValueError(f"batch {batch} is out of range: the inputs have {pattern.shape[0]} row(s).")
    labels = model.to_str_tokens(inputs)
    labels = labels[batch] if inputs.tokens.shape[0] > 1 else labels
    keep = inputs.attention_mask[batch].bool().cpu()
    pattern = pattern[batch][:, keep][:, :, keep]
    labels = [label for label, k in zip(labels, keep.tolist()) if k]
    if collapse_image:
        return _collapse_images(inputs, batch, keep, pattern, labels)
    return pattern, labels


def _head_names(layer: int, n_heads: int, tower: Tower) -> list[str]:
    prefix = "" if tower == "lm" else "vision "
    return [f"{prefix}L{layer}H{h}" for h in range(n_heads)]


def attention_heads(model: HookedVLM, inputs_or_cache: Any, layer: int, *, tower: Tower = "lm",
                    collapse_image: bool = False, cache: Any = None, batch: int = 0,
                    image_index: int = 0) -> Any:
    """circuitsvis ``attention_heads`` view (one thumbnail per head) of ``layer``.

    Returns a circuitsvis ``RenderedHTML`` (shown inline in notebooks; ``viz.save_html`` writes it).

    Example:
        >>> lm = viz.attention_heads(model, inputs, 1, collapse_image=True)
        >>> vision = viz.attention_heads(model, inputs, 0, tower="vision")
        >>> viz.save_html(vision, "vision_heads.html").name
        'vision_heads.html'
    """
    import circuitsvis as cv

    pattern, labels = attention_view_data(model, inputs_or_cache, layer, tower=tower,
                                          collapse_image=collapse_image, cache=cache, batch=batch,
                                          image_index=image_index)
    layer = layer % _n_layers(model, tower)
    return cv.attention.attention_heads(attention=pattern, tokens=labels,
                                        attention_head_names=_head_names(layer, pattern.shape[0], tower),
                                        mask_upper_tri=tower == "lm")


def attention_patterns(model: HookedVLM, inputs_or_cache: Any, layer: int, *, tower: Tower = "lm",
                       collapse_image: bool = False, cache: Any = None, batch: int = 0,
                       image_index: int = 0) -> Any:
    """circuitsvis ``attention_patterns`` view (hover a token to see where it attends) of ``layer``.

    Arguments as in ``attention_heads``; returns a circuitsvis ``RenderedHTML``.
    """
    import circuitsvis as cv

    pattern, labels = attention_view_data(model, inputs_or_cache, layer, tower=tower,
                                          collapse_image=collapse_image, cache=cache, batch=batch,
                                          image_index=image_index)
    return cv.attention.attention_patterns(tokens=labels, attention=pattern)
