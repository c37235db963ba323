"""Hugging Face's own calls: the reference every library is timed against and compared with.

Only torch and transformers are imported, so the TransformerLens 4 environment of the bridge peer
(``peers/tl_bridge_child.py``) times HF with this same code.
"""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ("eager", "sdpa")
PAD_TOKEN_ID = 0  # the benchmark tokenizer's <pad> (models.llava_config)


def load_hf(folder: Path, dtype: torch.dtype, device: str) -> dict:
    """``LlavaForConditionalGeneration`` from ``folder``, once per attention implementation."""
    from transformers import LlavaForConditionalGeneration

    return {
        impl: LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=impl)
        .to(device)
        .eval()
        for impl in ATTENTION
    }


def forward_cases(hf: dict, tokens: torch.Tensor, pixels: torch.Tensor) -> dict:
    """``hf_eager`` and ``hf_sdpa``: the forward pass (the floor is the faster of the two)."""
    return {
        f"hf_{impl}": (lambda impl=impl: hf[impl](input_ids=tokens, pixel_values=pixels).logits)
        for impl in ATTENTION
    }


def generate_cases(hf: dict, tokens: torch.Tensor, pixels: torch.Tensor, n_new: int) -> dict:
    """``hf_generate_sdpa`` and ``hf_generate_eager``: greedy, exactly ``n_new`` new tokens, KV cache on."""
    mask = torch.ones_like(tokens)

    def hf_generate(impl):
        return lambda: hf[impl].generate(
            input_ids=tokens,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
        )[:, tokens.shape[1] :]

    return {f"hf_generate_{impl}": hf_generate(impl) for impl in reversed(ATTENTION)}


def floor_s(timing: dict) -> float:
    """The HF floor of one set of interleaved rounds: the faster median of eager and sdpa."""
    return min(timing[f"hf_{impl}"]["median_s"] for impl in ATTENTION)


def generate_floor_s(timing: dict) -> float:
    """HF's fastest greedy generation (median seconds per call) in one set of rounds."""
    return min(timing[f"hf_generate_{impl}"]["median_s"] for impl in ATTENTION)
