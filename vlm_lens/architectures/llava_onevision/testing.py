"""Tiny seeded LLaVA-OneVision checkpoints for tests (the factories are shared with LLaVA-NeXT, in
``vlm_lens.architectures.llava_next.testing``), and a hypothesis strategy over configs."""

from __future__ import annotations

from typing import Any

from vlm_lens.architectures.llava_next.testing import (
    draw_anyres_case,
    load_pair,
    save_model,
    tiny_onevision_config,
)

__all__ = ["case_strategy", "load_pair", "save_model", "tiny_onevision_config"]


def case_strategy() -> Any:
    """Hypothesis strategy over tiny LLaVA-OneVision configurations and inputs (``vlm_lens.testing.Case``):
    LLaVA-NeXT's (``draw_anyres_case``) plus ``anyres_max_N``; a prompt with two images gives each one
    padded tile (``batch_num_images``)."""
    from hypothesis import strategies as st

    return st.composite(draw_anyres_case)(onevision=True)
