"""TransformerLens's gated MLP and unembedding without a weight copy per forward.

TransformerLens 3.9 computes ``F.linear(x, W.T.contiguous())``: a full copy of each weight on every
call (to match Hugging Face's bf16 accumulation order bit for bit). Here ``x @ W`` reads the stored
``[d_in, d_out]`` layout directly; BLAS handles either layout without copying. Hook names, hook order
and parameters are TransformerLens's own.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens.components import GatedMLP, Unembed


def nonzero_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """``bias``, or None where it is all zeros on the CPU (TransformerLens keeps zero biases that Hugging
    Face models do not have; on CPU, adding one costs a copy of the whole output). Checked on every call (a
    few microseconds for a vector): an edit through ``.data`` leaves no trace to key a memo on. A bias that
    autograd may train stays in, so that it gets its gradient. On GPUs the bias rides along in the GEMM and
    checking would stall the stream."""
    if bias is None or bias.device.type != "cpu" or (bias.requires_grad and torch.is_grad_enabled()):
        return bias
    return None if not bool(bias.any()) else bias


def addmm(bias: torch.Tensor | None, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` over any leading dimensions, as one BLAS call, reading ``weight`` in place."""
    flat = x.reshape(-1, x.shape[-1])
    bias = nonzero_bias(bias)
    flat = torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
    return flat.view(*x.shape[:-1], weight.shape[-1])


class FastGatedMLP(GatedMLP):
    """``GatedMLP`` (SwiGLU) with the same hooks: ``hook_pre``, ``hook_pre_linear``, ``hook_post``."""

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        if self.cfg.is_layer_norm_activation() or self.cfg.load_in_4bit:
            return super().forward(x)
        if self.W_gate.device != x.device:
            x = x.to(self.W_gate.device)
        pre_act = self.hook_pre(torch.matmul(x, self.W_gate))
        pre_linear = self.hook_pre_linear(torch.matmul(x, self.W_in))
        post_act = self.act_fn(pre_act) * pre_linear
        b_in = nonzero_bias(self.b_in)
        post_act = self.hook_post(post_act if b_in is None else post_act + b_in)
        return addmm(self.b_out, self.W_out, post_act)


class FastUnembed(Unembed):
    """``Unembed`` with the same hooks: ``hook_in`` and ``hook_out``."""

    def forward(
        self, residual: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_vocab_out"]:
        residual = self.hook_in(residual)
        return self.hook_out(addmm(self.b_U, self.W_U, residual))
