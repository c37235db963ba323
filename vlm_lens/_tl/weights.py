"""TransformerLens's weight converters fed a Hugging Face language model, and in-place parameter writes."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def convert_with_tl(converter: Callable[[Any, Any], dict[str, torch.Tensor]], hf_lm: nn.Module,
                    lm_head: nn.Module, cfg: Any) -> dict[str, torch.Tensor]:
    """Run a TransformerLens ``convert_*_weights`` on a VLM's language model: TransformerLens reads
    ``model.model`` and ``model.lm_head``, which a VLM keeps elsewhere, so it gets a stand-in."""
    return converter(SimpleNamespace(model=hf_lm, lm_head=lm_head), cfg)


def set_parameter(module: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    """Replace parameter ``name`` of ``module`` by ``tensor`` itself (no copy, unlike ``load_state_dict``)."""
    module._parameters[name] = nn.Parameter(tensor, requires_grad=requires_grad)
