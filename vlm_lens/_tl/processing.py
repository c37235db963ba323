"""TransformerLens's weight processing, applied to the language model's weights in place, one group at a time.

``ProcessWeights.process_weights`` clones the whole state dict in each of its steps and upcasts half
precision to float32 first: on the benchmark model most of a processed load's time, and on a 7B model the
language model held two or three times over. For an RMS-normed model (every family so far) its effect is
small and local, so this module applies TransformerLens's formulas to the same TransformerLens-shaped
tensors (views of HF's storage), writing into them, one block half at a time (``lm_groups``):

- ``fold_ln``: each RMSNorm's weight scales the ``d_model`` rows of the weights that read it (``ln1`` ->
  ``W_Q``, ``W_K``, ``W_V``; ``ln2`` -> ``W_in``, ``W_gate``; ``ln_final`` -> ``W_U``) and the norm is then
  the identity, so it is dropped (the model is built with ``RMSPre``); a norm the model keeps (a
  cross-attention block's ``ln_cross``) is left alone, as TransformerLens does, while an ``ln1``/``ln2``/
  ``ln_final`` whose readers are missing from its group is refused with a ``ValueError``;
- ``center_writing_weights``: LayerNorm only (TransformerLens skips it for RMS), nothing here;
- ``center_unembed``: ``W_U`` and ``b_U`` minus their means over the vocabulary;
- ``fold_value_biases``: ``b_O += sum over heads of b_V @ W_O``, then ``b_V = 0``.

No copies: on a memory-mapped checkpoint only the pages of the weights that change become process memory
(copy-on-write). Half precision gets one rounding, as in TransformerLens: a product of two bf16/fp16
numbers is exact in float32, where torch computes it, and the unembedding (folded and centred) is computed
in float32 a slice at a time and rounded once. ``tests/_tl/test_folding.py`` checks the results against
TransformerLens's own ``process_weights`` for every family's language model: bit for bit for the folds,
within one rounding where sums are taken in another order (means, value biases).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import Any

import torch

from vlm_lens._memory import populate_for_write
from vlm_lens.loading.weights import FOLDED_NORMS

# Rows of the unembedding processed at a time in float32 when it is stored in half precision.
_UNEMBED_ROWS = 256
# Heads of W_O read at a time in float32 when folding value biases of a half-precision model.
_HEADS_AT_ONCE = 8


def require_supported(cfg: Any) -> None:
    """This processing equals TransformerLens's for RMS-normed models with sequential blocks and dense MLPs
    (LayerNorm models also get centred weights and folded biases, which are not written here)."""
    if (
        cfg.normalization_type not in ("RMS", "RMSPre")
        or cfg.parallel_attn_mlp
        or getattr(cfg, "num_experts", None)
        or str(cfg.act_fn or "").startswith("solu")
    ):
        raise ValueError(
            "Weight processing is written for RMS-normed language models with sequential blocks and dense MLPs; "
            f"this one has normalization_type={cfg.normalization_type!r}, parallel_attn_mlp={cfg.parallel_attn_mlp}, "
            f"num_experts={getattr(cfg, 'num_experts', None)}, act_fn={cfg.act_fn!r}. Load it with "
            "from_pretrained_no_processing."
        )


def folded_config(cfg: Any) -> Any:
    """The config of the model that receives folded weights: its norms no longer scale."""
    out = copy.copy(cfg)
    out.normalization_type = "RMSPre" if cfg.normalization_type == "RMS" else cfg.normalization_type
    return out


def process_group(
    name: str,
    part: dict[str, torch.Tensor],
    cfg: Any,
    steps: dict[str, bool],
    copy_first: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Process one group of ``vlm_lens.loading.weights.lm_groups`` in place (``part`` is returned, with the
    folded norms dropped); ``copy_first``: keys to copy before writing them."""
    require_supported(cfg)
    _process_in_place(name, part, cfg, steps, copy_first)
    if steps.get("fold_ln"):
        unfolded = [k for k in part if k.endswith(FOLDED_NORMS)]
        if unfolded:
            raise ValueError(
                f"{name}: {unfolded} were not folded into the weights that read them; cannot drop them."
            )
    return part


def _process_in_place(
    name: str, part: dict[str, torch.Tensor], cfg: Any, steps: dict[str, bool], copy_first: Collection[str]
) -> None:
    def writable(key: str) -> torch.Tensor:
        if key in copy_first:
            part[key] = part[key].clone()  # keeps the strides: HF's layout stays a transposed view
        else:
            populate_for_write(part[key])  # a memory-mapped weight: its pages copied once, up front
        return part[key]

    if name.startswith("blocks."):
        prefix = name[: name.index(".", len("blocks.")) + 1]
        if name.endswith(".attn"):
            if steps.get("fold_ln"):
                _fold_norm(
                    part,
                    prefix + "ln1.w",
                    [_attn_key(part, prefix, x) for x in "QKV"],
                    (None, slice(None), None),
                    cfg,
                    writable,
                )
            if steps.get("fold_value_biases"):
                _fold_value_biases(part, prefix, cfg)
        elif steps.get("fold_ln") and not cfg.attn_only:
            readers = [prefix + "mlp.W_in"] + ([prefix + "mlp.W_gate"] if cfg.gated_mlp else [])
            _fold_norm(part, prefix + "ln2.w", readers, (slice(None), None), cfg, writable)
    elif name == "unembed":
        _process_unembed(part, cfg, bool(steps.get("fold_ln")), bool(steps.get("center_unembed")), writable)


def _attn_key(part: dict[str, torch.Tensor], prefix: str, which: str) -> str | None:
    """``attn.W_Q`` or, for grouped-query attention, ``attn._W_K`` (TransformerLens's two spellings)."""
    for key in (f"{prefix}attn.W_{which}", f"{prefix}attn._W_{which}"):
        if key in part:
            return key
    return None


def _norm_scale(weight: torch.Tensor, cfg: Any) -> torch.Tensor:
    return 1.0 + weight if getattr(cfg, "rmsnorm_uses_offset", False) else weight


def _fold_norm(
    part: dict[str, torch.Tensor],
    norm_key: str,
    readers: list[str | None],
    index: tuple,
    cfg: Any,
    writable: Callable[[str], torch.Tensor],
) -> None:
    """Scale the ``d_model`` axis of every reader by the norm's weight; the norm leaves ``part``. A norm whose
    readers are not all there stays in ``part``: ``process_group`` refuses it if the model drops that norm
    (``FOLDED_NORMS``), and leaves it alone otherwise (a cross-attention block's, as in TransformerLens)."""
    if norm_key not in part or any(key is None or key not in part for key in readers):
        return
    scale = _norm_scale(part.pop(norm_key), cfg)[index]
    for key in readers:
        writable(key).mul_(scale)


def _fold_value_biases(part: dict[str, torch.Tensor], prefix: str, cfg: Any) -> None:
    """``b_O += sum_heads b_V @ W_O`` in float32, ``b_V = 0`` (grouped value biases repeated per head)."""
    b_v_key = next((k for k in (prefix + "attn.b_V", prefix + "attn._b_V") if k in part), None)
    if b_v_key is None or part[b_v_key].numel() == 0:
        return
    b_v = part[b_v_key]
    if b_v.device.type != "meta" and not bool(b_v.any()):
        return  # adds exactly zero (Llama-style converters give zero value biases): W_O need not be read
    w_o, b_o_key = part[prefix + "attn.W_O"], prefix + "attn.b_O"
    b = b_v.float().repeat_interleave(w_o.shape[0] // b_v.shape[0], dim=0)
    folded = torch.zeros(w_o.shape[-1], dtype=torch.float32, device=w_o.device)
    for start in range(0, w_o.shape[0], _HEADS_AT_ONCE):
        heads = slice(start, start + _HEADS_AT_ONCE)
        folded += torch.einsum("nh,nhm->m", b[heads], w_o[heads].float())
    b_o = part.get(b_o_key)
    part[b_o_key] = folded if b_o is None else (b_o.float() + folded).to(b_o.dtype)
    part[b_v_key] = torch.zeros_like(b_v)


def _process_unembed(
    part: dict[str, torch.Tensor],
    cfg: Any,
    fold_ln: bool,
    center: bool,
    writable: Callable[[str], torch.Tensor],
) -> None:
    """Fold ``ln_final`` into ``W_U`` [d_model, d_vocab] and centre it over the vocabulary, in one pass."""
    if "unembed.W_U" not in part:
        return  # ln_final stays in the group: process_group refuses a norm it could not fold
    norm = part.pop("ln_final.w", None) if fold_ln else None
    if norm is None and not center:
        return
    w_u = writable("unembed.W_U")
    scale = None if norm is None else _norm_scale(norm, cfg)[:, None]
    exact = w_u.dtype == torch.float32
    # Half precision: float32 a slice of rows at a time, rounded once at the end (TransformerLens upcasts it
    # all), in one buffer laid out like W_U's HF storage so that the means sum in the same order.
    step = w_u.shape[0] if exact else _UNEMBED_ROWS
    buffer = None if exact else torch.empty(w_u.shape[1], step, dtype=torch.float32, device=w_u.device)
    for start in range(0, w_u.shape[0], step):
        rows = slice(start, start + step)
        block = w_u[rows] if exact else buffer[:, : w_u[rows].shape[0]].T.copy_(w_u[rows])
        if scale is not None:
            block.mul_(scale[rows])
        if center:
            block.sub_(block.mean(-1, keepdim=True))
        if not exact:
            w_u[rows].copy_(block)
    if center and "unembed.b_U" in part:
        b_u = part["unembed.b_U"]
        part["unembed.b_U"] = (b_u.float() - b_u.float().mean()).to(b_u.dtype)
