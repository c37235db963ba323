"""TransformerLens's normalisations through torch's fused kernels while their hooks are unused.

TransformerLens computes LayerNorm as nine elementwise ops and RMSNorm as six, so that ``hook_scale``
and ``hook_normalized`` can see the intermediate values. While neither hook point has a hook, these
subclasses call ``F.layer_norm`` / ``F.rms_norm`` instead (the same formula: biased variance, ``eps``
inside the square root, statistics in float32); with a hook attached they run TransformerLens's code.

In half precision the fused LayerNorm applies the weight and bias in float32 and rounds once, as Hugging
Face's ``nn.LayerNorm`` (the vision towers') does; TransformerLens rounds the normalised value first and
then applies them in half precision (two more roundings, and a third of a CLIP block's elementwise time).
RMSNorm keeps TransformerLens's roundings, which are Hugging Face's (Llama's RMSNorm rounds the normalised
value before the weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

from vlm_lens._tl.fast.attention import has_any_hook


def _hooked(norm) -> bool:
    return has_any_hook(norm.hook_scale) or has_any_hook(norm.hook_normalized)


def _normalize(norm, x: torch.Tensor, centre: bool) -> torch.Tensor:
    """The normalised input in the config's dtype, as TransformerLens's ``hook_normalized`` sees it."""
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    shape = (x32.shape[-1],)
    out = F.layer_norm(x32, shape, eps=norm.eps) if centre else F.rms_norm(x32, shape, eps=norm.eps)
    return out.to(norm.cfg.dtype)


def _fused_affine(norm, x: torch.Tensor) -> bool:
    """Whether the weight (and bias) can go into the fused kernel: no dtype round trip in between."""
    return x.dtype == norm.cfg.dtype == norm.w.dtype and x.dtype in (torch.float32, torch.float64) \
        and x.device == norm.w.device


class FastLayerNorm(LayerNorm):
    """``LayerNorm`` with ``hook_scale`` / ``hook_normalized``; fused while they are unhooked."""

    def forward(self, x):
        if _hooked(self):
            return super().forward(x)
        if x.dtype == self.cfg.dtype == self.w.dtype and x.device == self.w.device:  # any precision
            return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        return _normalize(self, x, centre=True) * self.w + self.b


class FastLayerNormPre(LayerNormPre):
    """``LayerNormPre`` (weights folded into the next layer); fused while unhooked."""

    def forward(self, x):
        return super().forward(x) if _hooked(self) else _normalize(self, x, centre=True)


class FastRMSNorm(RMSNorm):
    """``RMSNorm`` with ``hook_scale`` / ``hook_normalized``; ``F.rms_norm`` while they are unhooked."""

    def forward(self, x):
        if _hooked(self):
            return super().forward(x)
        if _fused_affine(self, x):
            return F.rms_norm(x, (x.shape[-1],), self.w, self.eps)
        return _normalize(self, x, centre=False) * self.w


class FastRMSNormPre(RMSNormPre):
    """``RMSNormPre`` (weights folded into the next layer); ``F.rms_norm`` while unhooked."""

    def forward(self, x):
        return super().forward(x) if _hooked(self) else _normalize(self, x, centre=False)
