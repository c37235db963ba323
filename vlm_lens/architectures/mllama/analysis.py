"""The analysis tools on cross-attention keys.

- Ablation needs nothing new: ``vlm_lens.analysis.image_ablation_hooks(inputs, positions, ...)`` replaces rows of
  ``hook_image_embeds`` (the projector's output), and Mllama's layout puts each image on its row's *key axis*,
  so ``positions`` are keys (``inputs.layout.grid(i)``) and every cross-attention layer reads the ablated value.
- ``cross_knockout_hooks``: text queries stop reading chosen image keys in chosen cross-attention blocks.
- ``cross_kv``: the keys and values of a cross-attention block (what probes of image keys/values read).

Logit lens: the residual stream holds text positions only; ``vlm_lens.analysis.logit_lens`` with text
``positions`` reads what the text positions predict after each block, cross-attention blocks included (their
``hook_resid_post``): how reading the image changes the prediction, not what an image token "means".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float

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
