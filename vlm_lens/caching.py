"""Caching hooks that keep only some sequence positions, made small before they leave the device.

``HookedVLM.run_with_cache`` uses these for ``pos_slice=`` (TransformerLens's argument) and
``image_tokens_only=True``; without either it is TransformerLens's own caching.

Which hooks are filtered: the language model's (``hook_embed``, ``blocks.*``, ``ln_final.*``,
``unembed.*``), whose activations have the sequence position at dimension 1 (``[batch, pos, ...]``),
or dimension 2 for ``hook_attn_scores`` / ``hook_pattern`` (``[batch, head, query_pos, key_pos]``: the
query positions are kept, every key position stays). Vision-side hooks (``vision.*``, ``projector.*``,
``hook_image_features``, ``hook_image_embeds``, a family's own modules) are cached whole: their positions
are patches, not sequence positions; so are language-model hooks the pipeline lists in ``key_axis_hooks``
(cross-attention keys and values, ``[batch, image_keys, ...]``).

Layouts:

* ``pos_slice``: as TransformerLens's ``run_with_cache`` (an int, a ``(start, stop)`` tuple, a list or a
  ``Slice``; an int keeps a position dimension of length 1),
  applied at the position dimension above (TransformerLens's own rule slices ``hook_rot_q/k`` and
  ``hook_q_input`` at the wrong dimension; this one does not).
* ``image_tokens_only=True``: every language-model tensor becomes ``[total_image_tokens, ...]``: the image
  tokens of row 0 in sequence order, then those of row 1, ... (rows may hold different numbers of image
  tokens under padding, so there is no batch dimension); attention scores and patterns become
  ``[total_image_tokens, head, key_pos]``. ``inputs.image_mask.nonzero()`` lists the (row, position) of
  each entry, in the same order.

Each kept tensor is sliced on the model's device, then moved to ``device``, and never holds on to the
full activation's memory (a slice that is a view is copied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformer_lens.utilities import Slice

from vlm_lens.hook_names import is_sequence_hook, position_dim
from vlm_lens.inputs import VLMInputs

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM

def _own_memory(kept: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``kept`` without a reference to the rest of ``source``'s memory."""
    if kept.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return kept.clone()
    return kept


def filtered_caching_hooks(
    hook_names: list[str], names_filter: Callable[[str], bool], *, device: Any = None,
    remove_batch_dim: bool = False, pos_slice: Slice | None = None, image_mask: torch.Tensor | None = None,
    key_axis_hooks: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], list]:
    """A cache dict and forward hooks filling it (see the module docstring for the layouts)."""
    cache: dict[str, torch.Tensor] = {}

    def save(tensor: torch.Tensor, hook: Any) -> None:
        name = hook.name
        value = tensor.detach()
        if is_sequence_hook(name, key_axis_hooks):
            dim = position_dim(name)
            if image_mask is not None:
                value = _image_rows(value, dim, image_mask, name)
            else:
                if remove_batch_dim:
                    value, dim = value[0], dim - 1
                if value.dim() > dim:
                    value = pos_slice.apply(value, dim=dim)
            value = _own_memory(value, tensor)
        elif remove_batch_dim:
            value = value[0]
        cache[name] = value.to(device) if device is not None else value

    return cache, [(name, save) for name in hook_names if names_filter(name)]


def _image_rows(value: torch.Tensor, dim: int, image_mask: torch.Tensor, name: str) -> torch.Tensor:
    batch, pos = image_mask.shape
    if value.dim() <= dim or value.shape[0] != batch or value.shape[dim] != pos:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}, not [batch={batch}, ..., pos={pos}, ...] at dimension {dim}, "
            "so its image tokens cannot be picked. image_tokens_only=True needs one forward pass over the "
            "whole input (no past_kv_cache, no start_at_layer)."
        )
    if dim != 1:
        value = value.movedim(dim, 1)
    return value[image_mask.to(value.device)]


def names_filter_fn(names_filter: Any) -> Callable[[str], bool]:
    """TransformerLens's ``names_filter`` forms (None, a name, a list of names, a function) as a function."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, list):
        allowed = set(names_filter)
        return lambda name: name in allowed
    if callable(names_filter):
        return names_filter
    raise ValueError("names_filter must be None, a hook name, a list of hook names, or a function of the name.")


def unwrap_pos_slice(pos_slice: Any) -> Slice | None:
    return None if pos_slice is None else Slice.unwrap(pos_slice)


def run_with_filtered_cache(model: HookedVLM, model_args: tuple, image_tokens_only: bool, kwargs: dict) -> Any:
    """``HookedVLM.run_with_cache`` with ``pos_slice`` or ``image_tokens_only``: slicing caching hooks."""
    from transformer_lens.ActivationCache import ActivationCache

    names_filter = kwargs.pop("names_filter", None)
    device = kwargs.pop("device", None)
    remove_batch_dim = kwargs.pop("remove_batch_dim", False)
    pos_slice = unwrap_pos_slice(kwargs.pop("pos_slice", None))
    return_cache_object = kwargs.pop("return_cache_object", True)
    for unsupported in ("incl_bwd", "reset_hooks_end", "clear_contexts"):
        if kwargs.pop(unsupported, None):
            raise ValueError(f"{unsupported}=True is not supported with pos_slice or image_tokens_only; "
                             "cache everything and slice afterwards.")
    image_mask = None
    if image_tokens_only:
        if pos_slice is not None or remove_batch_dim:
            raise ValueError("image_tokens_only=True already picks positions and removes the batch "
                             "dimension; drop pos_slice / remove_batch_dim.")
        image_mask = _image_mask_of(model, model_args[0] if model_args else kwargs.get("input"))
    cache, hooks = filtered_caching_hooks(
        list(model.hook_dict), names_filter_fn(names_filter), device=device,
        remove_batch_dim=remove_batch_dim, pos_slice=pos_slice, image_mask=image_mask,
        key_axis_hooks=model.pipeline.key_axis_hooks)
    with model.hooks(fwd_hooks=hooks):
        out = model(*model_args, **kwargs)
    if not return_cache_object:
        return out, cache
    return out, ActivationCache(cache, model, has_batch_dim=not (remove_batch_dim or image_tokens_only))

def _image_mask_of(model: HookedVLM, input: Any) -> torch.Tensor:
    if isinstance(input, VLMInputs):
        return input.image_mask
    if torch.is_tensor(input):
        tokens = input if input.ndim == 2 else input[None]
        return tokens == model.image_token_id
    raise ValueError("image_tokens_only=True needs a VLMInputs or a [batch, pos] token tensor as input.")


__all__ = ["filtered_caching_hooks", "is_sequence_hook", "names_filter_fn", "position_dim", "run_with_filtered_cache",
           "unwrap_pos_slice"]
