"""PaliGemma's prefix-LM attention: the image tokens and the text prefix attend to each other in both
directions; the suffix (the answer, and every generated token) attends causally.

transformers' ``PaliGemmaModel`` takes the processor's ``token_type_ids`` (0: image and prefix, 1: suffix, which
``PaliGemmaProcessor(suffix=...)`` writes) and lets every prefix query attend to every prefix key on top of the
causal mask. On Gemma 2's sliding-window layers that union comes after the window (OR(AND(window, causal),
prefix)): a prefix query reads the whole prefix even past its window.

Here the prefix comes from ``token_type_ids`` (an extra input, see ``pipeline``) and travels with the encoded
images (``ImagePlan.side_outputs["prefix"]``), so it is in every call that covers the prompt, including each
step of ``generate`` without the KV cache, where the positions after the prompt are generated suffix. It is
given to every language-model layer through ``vlm_lens._tl.components.with_attention_overlay``, so the mask is
in the scores before ``hook_attn_scores`` (attention knockout adds to it). Without ``token_type_ids`` the whole
prompt is the prefix, as the processor writes it when no suffix is given. A call without images (and the KV-cache
steps of ``generate``, which hold only generated tokens) is causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool

from vlm_lens.context import CALL

PREFIX = "prefix"  # the key in ImagePlan.side_outputs / CallContext.side_outputs


def prefix_from_token_type_ids(token_type_ids: torch.Tensor | None) -> Bool[torch.Tensor, "batch pos"] | None:
    """True where the processor's ``token_type_ids`` mark the prefix (0); None without them.

    Example:
        >>> prefix_from_token_type_ids(torch.tensor([[0, 0, 0, 1, 1]]))
        tensor([[ True,  True,  True, False, False]])
    """
    if token_type_ids is None:
        return None
    token_type_ids = torch.as_tensor(token_type_ids)
    if token_type_ids.ndim != 2:
        raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; give [batch, pos] as the "
                         "processor returns it (0 for image and prefix, 1 for the suffix).")
    return token_type_ids == 0


def prefix_overlay(n_queries: int, n_keys: int, offset: int, device: torch.device) -> torch.Tensor | None:
    """[batch, 1, n_queries, n_keys]: True where query and key are both in the prefix; None for a causal call.

    The prefix covers the prompt (the call's image mask has its length); later keys are generated suffix."""
    call = CALL.get()
    if call is None or PREFIX not in call.side_outputs or call.image_mask is None:
        return None
    prompt = call.image_mask
    prefix = call.side_outputs[PREFIX]
    prefix = torch.ones_like(prompt, dtype=torch.bool) if prefix is None else prefix.to(prompt.device)
    if prefix.shape != prompt.shape:
        raise ValueError(f"token_type_ids has shape {tuple(prefix.shape)} but the tokens have shape "
                         f"{tuple(prompt.shape)}; pass the token_type_ids of the processor call that made the tokens.")
    if prefix.shape[1] > n_keys:
        raise ValueError(f"The prompt's prefix covers {prefix.shape[1]} positions, past the {n_keys} keys of this "
                         "attention layer; the forward context and the KV cache disagree.")
    keys = F.pad(prefix.to(device=device, dtype=torch.bool), (0, max(n_keys - prefix.shape[1], 0)), value=False)
    queries = keys[:, offset:offset + n_queries]
    return (queries[:, :, None] & keys[:, None, :])[:, None]
