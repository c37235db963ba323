"""Logit lens on visual tokens: the vocabulary read of every layer's residual at chosen positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from vlm_lens.analysis.positions import per_row
from vlm_lens.hook_names import act_names
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs


@dataclass(frozen=True)
class LogitLensResult:
    """Top-k tokens per layer and position. ``top_tokens``/``top_probs``: [n_layers, batch, n_pos, k]."""

    layer_names: list[str]
    positions: list[torch.Tensor]  # per batch row, the positions read (same n_pos for every row)
    top_tokens: Int[torch.Tensor, "n_layers batch n_pos k"]
    top_probs: Float[torch.Tensor, "n_layers batch n_pos k"]
    inputs: VLMInputs

    def on_grid(self, image: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, probs) of image ``image`` as [n_layers, rows, cols, k]; every grid cell must be read."""
        layout = self.inputs.layout
        grid, b = layout.grid(image), layout.batch_of(image)
        where = {int(p): i for i, p in enumerate(self.positions[b].tolist())}
        missing = [int(p) for p in grid.flatten() if int(p) not in where]
        if missing:
            raise ValueError(f"image {image}'s grid positions {missing[:5]}... were not read by the lens.")
        idx = torch.tensor([where[int(p)] for p in grid.flatten()])
        shape = (len(self.layer_names), *grid.shape, self.top_tokens.shape[-1])
        return self.top_tokens[:, b, idx].reshape(shape), self.top_probs[:, b, idx].reshape(shape)

    def str_tokens(self, tokenizer: Any, image: int) -> list:
        """Nested list [n_layers][rows][cols][k] of decoded tokens for image ``image``."""
        tokens, _ = self.on_grid(image)
        return [[[[tokenizer.decode([t]) for t in cell] for cell in row] for row in layer]
                for layer in tokens.tolist()]


def _stream_names(n_layers: int, stream: str) -> list[str]:
    if stream not in ("resid_post", "resid_pre"):
        raise ValueError(f"stream must be 'resid_post' or 'resid_pre', got {stream!r}.")
    return act_names(stream, range(n_layers))


@torch.no_grad()
def logit_lens(model: HookedVLM, inputs: VLMInputs, *, positions: Any = None, k: int = 5,
               stream: Literal["resid_post", "resid_pre"] = "resid_post", cache: Any = None) -> LogitLensResult:
    """Apply the final norm and the unembedding to each layer's residual at ``positions``.

    ``positions`` defaults to every image token of each batch row. The final norm is applied once to
    the raw residual (never to ``ln_final.hook_normalized``), so the last layer's ``resid_post`` reads
    exactly the model's own output distribution. Only the needed activations are cached.
    """
    names = _stream_names(model.cfg.n_layers, stream)
    if cache is None:
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in names)
    batch = inputs.tokens.shape[0]
    if positions is None:
        if inputs.layout.axis == "keys":
            raise ValueError("this model reads images through cross-attention: its image positions are keys, not "
                             "sequence positions, and the residual stream holds text only; pass text `positions`.")
        rows = [inputs.layout.image_positions(b) for b in range(batch)]
    else:
        rows = per_row(positions, batch)
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every batch row must read the same number of positions.")
    index = torch.stack(rows).to(model.cfg.device)
    tokens, probs = [], []
    for name in names:
        resid = cache[name].gather(1, index[..., None].expand(-1, -1, model.cfg.d_model))
        logits = model.unembed(model.ln_final(resid)).float()
        cap = model.cfg.output_logits_soft_cap
        if cap and cap > 0:  # as the model's forward does (soft-capped logits)
            logits = cap * torch.tanh(logits / cap)
        p, t = logits.softmax(-1).topk(k, dim=-1)
        tokens.append(t.cpu())
        probs.append(p.cpu())
    return LogitLensResult(names, rows, torch.stack(tokens), torch.stack(probs), inputs)


def _target_ids(tokenizer: Any, word: str) -> set[int]:
    """The tokens of the word's spellings (as is, capitalised, after a space), without special tokens (a
    spelling the tokenizer does not know encodes to ``<unk>``) or pieces that decode to nothing (a bare
    word-start marker)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = set()
    for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        ids.update(t for t in tokenizer.encode(variant, add_special_tokens=False)
                   if t not in special and tokenizer.decode([t]).strip())
    return ids


def hit_rate(result: LogitLensResult, tokenizer: Any, targets: list[str], *, k: int = 1,
             match: Literal["exact", "prefix"] = "exact", image: int | None = None,
             mask: torch.Tensor | None = None) -> Float[torch.Tensor, "n_layers"]:
    """Per layer, the fraction of read positions whose top-``k`` holds a token of one of ``targets``.

    ``match="exact"``: the token is one of the targets' own tokens; ``"prefix"``: the decoded token
    (stripped, lower-cased, >= 2 characters) is a prefix of a target word, counting word fragments as
    Neo et al. (2024) did. ``image``/``mask`` restrict to one image's grid cells where ``mask`` is True.
    """
    if match not in ("exact", "prefix"):
        raise ValueError(f"match must be 'exact' or 'prefix', got {match!r}.")
    if not 1 <= k <= result.top_tokens.shape[-1]:
        raise ValueError(f"k={k}, but the lens kept the top {result.top_tokens.shape[-1]} tokens; run logit_lens "
                         f"with k >= {k}.")
    words = [t.lower() for t in targets]
    exact = set().union(*(_target_ids(tokenizer, w) for w in targets)) if targets else set()

    def hit(token: int) -> bool:
        if match == "exact":
            return token in exact
        piece = tokenizer.decode([token]).strip().lower()
        return len(piece) >= 2 and any(w.startswith(piece) for w in words)

    if image is not None:
        tokens, _ = result.on_grid(image)  # [L, rows, cols, k]
        if mask is not None:
            tokens = tokens[:, torch.as_tensor(mask, dtype=torch.bool)]
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    else:
        tokens = result.top_tokens.reshape(result.top_tokens.shape[0], -1, result.top_tokens.shape[-1])
    tokens = tokens[..., :k]
    cache: dict[int, bool] = {}
    hits = torch.tensor([[any(cache.setdefault(t, hit(t)) for t in cell) for cell in layer]
                         for layer in tokens.tolist()], dtype=torch.float32)
    return hits.mean(-1) if hits.numel() else torch.zeros(tokens.shape[0])
