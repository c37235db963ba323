"""Deepstack: the features of some vision blocks, merged, added to the first language-model layers' output.

transformers' ``Qwen3VLTextModel`` adds, after decoder layer ``k`` (``k < len(deepstack_visual_indexes)``),
the ``k``-th deepstack merger's output at the image positions. Here that is module code, not a hook:
``DeepstackBlock`` is TransformerLens's block with that term in its output (``ResidualTermBlock``), read
from the call's context (``CallContext.side_outputs[DEEPSTACK]``, written by ``Qwen3VLPipeline.features``).

Hooks, in order of a forward pass:

- ``deepstack.{k}.hook_in`` [n_image_tokens, merge**2 * d_vision]: the vision block's output, merged;
  ``deepstack.{k}.ln_q.*``, ``deepstack.{k}.hook_hidden``; ``deepstack.{k}.hook_out``
  [n_image_tokens, d_model] in sequence order (fired once per image encode, so once per ``generate``);
- ``blocks.{k}.hook_deepstack`` [batch, pos, d_model]: what layer ``k`` adds to its residual stream, zero
  outside the image positions (fired on every call that covers the prompt's images).

``blocks.{k}.hook_resid_post`` (= ``blocks.{k+1}.hook_resid_pre``) includes the term; ``hook_mlp_out`` does
not, so a decomposition of the residual stream needs ``hook_deepstack`` besides the attention and MLP outputs.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens._tl.components import ResidualTermBlock
from vlm_lens.context import CALL

DEEPSTACK = "deepstack"  # key of the deepstack features in CallContext.side_outputs


class DeepstackBlock(ResidualTermBlock):
    """Language-model block ``k``: TransformerLens's block plus the ``k``-th deepstack features at the
    current call's image positions."""

    def __init__(self, cfg: HookedTransformerConfig, block_index: int):
        super().__init__(cfg, block_index)
        self.deepstack_index = block_index
        self.hook_deepstack = HookPoint()  # [batch, pos, d_model]

    def residual_term(self, mlp_out: Float[torch.Tensor, "batch pos d_model"]) -> torch.Tensor | None:
        call = CALL.get()
        features = None if call is None else call.side_outputs.get(DEEPSTACK)
        if features is None or call.image_mask is None:
            return None  # no image in this call (text only, or a KV-cached step after the prompt)
        mask = call.image_mask.to(mlp_out.device)
        if mask.shape[1] < mlp_out.shape[1]:  # generation without KV cache: the new tokens are text
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], mlp_out.shape[1] - mask.shape[1])], dim=1)
        values = features[self.deepstack_index].to(device=mlp_out.device, dtype=mlp_out.dtype)
        return self.hook_deepstack(torch.zeros_like(mlp_out).masked_scatter(mask[..., None], values))
