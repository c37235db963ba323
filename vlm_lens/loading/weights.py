"""Which language-model weights are processed together, and moving them out of dicts one at a time.

TransformerLens's weight processing relates only weights of the same block half (a norm and the weights
that read it, a block's value biases and its output bias), or the embedding, or the final norm and the
unembedding; ``lm_groups`` lists those groups so ``vlm_lens._tl.processing.process_group`` can run
TransformerLens's own code on one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from vlm_lens._memory import span_bytes

# Only the language model's own weights are processed (vision tower, projector and extras such as
# LLaVA-NeXT's image_newline are left as they are).
LM_PREFIXES = ("embed.", "pos_embed.", "blocks.", "ln_final.", "unembed.")
FOLDED_NORMS = (".ln1.w", ".ln2.w", "ln_final.w")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def processed_keys(keys: Any, fold_ln: bool) -> set[str]:
    """The state-dict keys left after processing (folded norm weights are dropped)."""
    return {k for k in keys if not (fold_ln and k.startswith(LM_PREFIXES) and k.endswith(FOLDED_NORMS))}


def lm_groups(keys: Any) -> Iterator[tuple[str, list[str]]]:
    """Language-model keys in processing groups: the embedding; per block its attention (with ``ln1``)
    and its MLP (with ``ln2``), which no processing step relates; then the unembedding."""
    keys = [k for k in keys if k.startswith(LM_PREFIXES)]
    blocks: dict[str, list[str]] = {}
    for key in keys:
        match = _BLOCK.match(key)
        if match:
            part = "mlp" if key[match.end():].startswith(("ln2.", "mlp.")) else "attn"
            blocks.setdefault(f"blocks.{int(match.group(1))}.{part}", []).append(key)
    yield "embed", [k for k in keys if k.startswith(("embed.", "pos_embed."))]
    for name in sorted(blocks, key=lambda n: (int(n.split(".")[1]), n)):
        yield name, blocks[name]
    yield "unembed", [k for k in keys if k.startswith(("ln_final.", "unembed."))]


def shared_memory_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensors share memory with another key's (tied embeddings, say): processing in place must
    copy them before writing. Spans are compared, so views of one buffer count as sharing only where they
    overlap (the rows of a fused q/k/v weight do not)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + span_bytes(t), k) for k, t in state.items()
                   if t.device.type != "meta" and t.numel())
    shared, end, owner = set(), -1, None
    for start, stop, key in spans:
        if start < end:
            shared.update((key, owner))
        if stop > end:
            end, owner = stop, key
    return shared


def drain(d: dict) -> Iterator[tuple[str, Any]]:
    """Pop items one by one, so the source dict stops referencing each tensor as it moves."""
    while d:
        key = next(iter(d))
        yield key, d.pop(key)
