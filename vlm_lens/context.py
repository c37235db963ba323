"""Per-call state, scoped to the call that made it.

TransformerLens calls ``embed(tokens)`` and each attention layer with fixed signatures, so what one forward
pass of a ``HookedVLM`` needs beyond the tokens (which positions receive image embeddings and the
embeddings themselves, a family's position ids) cannot be passed down as arguments. It is bound for the
duration of the call with ``Scoped.bind`` (a ``contextvars.ContextVar``): nothing is stored on a module,
the previous value comes back when the call ends, also when a hook raises, and concurrent threads each
see their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class Scoped(Generic[T]):
    """A value visible only inside ``with scoped.bind(value):`` (and to code called from there)."""

    def __init__(self, name: str) -> None:
        self._var: ContextVar[T | None] = ContextVar(name, default=None)

    @contextmanager
    def bind(self, value: T) -> Iterator[T]:
        token = self._var.set(value)
        try:
            yield value
        finally:
            self._var.reset(token)

    def get(self) -> T | None:
        return self._var.get()


@dataclass
class CallContext:
    """What one forward pass of a ``HookedVLM`` carries besides the tokens."""

    image_mask: torch.Tensor | None = None  # [batch, pos] positions that receive image embeddings
    image_embeds: torch.Tensor | None = None  # [n_image_tokens, d_model] in sequence order
    positions: Any = None  # a family's position ids for the call's keys (e.g. M-RoPE), or None
    side_outputs: dict[str, Any] = field(default_factory=dict)  # the encode's ImagePlan.side_outputs
    offset: int = 0  # positions already in the KV cache: the call's first token sits at this absolute position


@dataclass
class PromptImages:
    """The prompt's images inside ``generate``: encoded once, written wherever a call covers the prompt.

    ``positions`` holds a family's position ids of every key so far (the KV cache stores keys before
    their rotary, so the next step continues from them); ``generate`` owns this object and drops it at
    the end.
    """

    image_mask: torch.Tensor  # [batch, prompt_pos]
    image_embeds: torch.Tensor | None
    extras: dict[str, Any] = field(default_factory=dict)
    positions: Any = None
    side_outputs: dict[str, Any] = field(default_factory=dict)  # the encode's ImagePlan.side_outputs


CALL: Scoped[CallContext] = Scoped("vlm_lens_call")
