"""Generation with images: the vision tower runs once, hooks fire on every step.

With the key-value cache the images enter on the prefill only; without it every step re-runs the
whole sequence and the same image embeddings are written at the prompt's image positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm
from transformer_lens.utilities import get_attention_mask
from transformer_lens.utilities.logits_utils import sample_logits

from vlm_lens._tl.kv_cache import new_cache
from vlm_lens.context import PromptImages
from vlm_lens.inputs import VLMInputs

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


def _as_inputs(model: HookedVLM, input: Any, pixel_values: torch.Tensor | None, attention_mask: torch.Tensor | None,
               extras: dict[str, Any]) -> VLMInputs:
    from vlm_lens.inputs import inputs_from_tokens

    if isinstance(input, VLMInputs):
        if pixel_values is not None or attention_mask is not None:
            raise ValueError("Pass pixel_values and attention_mask inside the VLMInputs or with tokens, not both.")
        return input
    if isinstance(input, (str, list)):
        if model.processor is not None:
            return model.prepare(input)
        input = model.to_tokens(input)
    tokens = input if input.ndim == 2 else input[None]
    model._check_image_inputs(tokens, pixel_values, extras)  # clear errors before the layout is built
    tok = model.tokenizer
    if attention_mask is None and tok is not None and tok.pad_token_id is not None:
        # generate() continues rows from their ends, so padding is on the left: leading pad tokens are padding
        # (TransformerLens's rule for a left-padding tokenizer, with a BOS that doubles as pad kept)
        attention_mask = get_attention_mask(tok, tokens, model.cfg.default_prepend_bos, padding_side="left")
    return inputs_from_tokens(model, tokens, pixel_values, attention_mask=attention_mask, **extras)


def _pad_token(model: HookedVLM, stop: torch.Tensor | None) -> int:
    """What finished rows are padded with: as HF's generate, the generation_config's pad token, else the first
    stop token; for a model without a generation_config (built by hand), the tokenizer's pad token first."""
    candidates = [model.generation_pad_token_id]
    if model.generation_eos_token_ids is None and model.tokenizer is not None:
        candidates.append(model.tokenizer.pad_token_id)
    candidates.append(None if stop is None else int(stop[0]))
    return next((t for t in candidates if t is not None), 0)


def _stop_tokens(model: HookedVLM, eos_token_id: int | Sequence[int] | None) -> torch.Tensor | None:
    """The tokens that end a row: those given, else the checkpoint's generation_config (HF's default, which
    may list several), else the tokenizer's eos token."""
    if eos_token_id is None:
        eos_token_id = model.generation_eos_token_ids
    if eos_token_id is None and model.tokenizer is not None:
        eos_token_id = model.tokenizer.eos_token_id
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=model.cfg.device) if ids else None


def generate(
    model: HookedVLM,
    input: Any,
    max_new_tokens: int = 10,
    *,
    pixel_values: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_past_kv_cache: bool = True,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    fwd_hooks: list[tuple[Any, Any]] | tuple = (),
    return_type: Literal["tokens", "new_tokens", "str", "new_str"] = "tokens",
    verbose: bool = False,
    seed: int | None = None,
    **extras: Any,
) -> Any:
    """Generate ``max_new_tokens`` tokens after the prompt (greedy unless ``do_sample``).

    Returns the whole sequence as tokens (``"tokens"``, as HookedTransformer does), only the new tokens
    (``"new_tokens"``), or decoded text (``"str"``: whole, image tokens collapsed to one placeholder;
    ``"new_str"``: the continuation only). Finished rows are padded with the pad token. A row finishes at
    any of ``eos_token_id`` (one id or several; by default the checkpoint's ``generation_config`` stop
    tokens, as HF's ``generate``, else the tokenizer's eos). Tokens given without ``attention_mask`` have
    their leading pad tokens masked (rows must not end in padding).
    """
    if return_type not in ("tokens", "new_tokens", "str", "new_str"):
        raise ValueError(f"return_type={return_type!r}; use 'tokens', 'new_tokens', 'str' or 'new_str'.")
    unknown = set(extras) - set(model.pipeline.extra_keys)
    if unknown:
        raise ValueError(f"generate() got unexpected arguments {sorted(unknown)}.")
    inputs = _as_inputs(model, input, pixel_values, attention_mask, extras)
    pixel_values = inputs.pixel_values
    extras = {k: v for k, v in inputs.extras.items() if k in model.pipeline.extra_keys}
    device = model.cfg.device
    tokens, attention_mask = inputs.tokens.to(device), inputs.attention_mask.to(device).long()
    image_mask, plan = model._check_image_inputs(tokens, pixel_values, extras)
    if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"{tokens.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed the context of {model.cfg.n_ctx}."
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate() continues every row from its last position, but some rows end in padding: "
                         "pad on the left (model.prepare(..., padding_side='left'), the default).")
    if seed is not None:
        torch.manual_seed(seed)
    stop = _stop_tokens(model, eos_token_id)
    pad_id = _pad_token(model, stop)
    batch, prompt_len = tokens.shape
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = new_cache(model.cfg, device, batch) if use_past_kv_cache else None

    with model.hooks(fwd_hooks=list(fwd_hooks)):
        # The prompt's images, encoded once; this object lives for this call only.
        embeds = None if plan is None else model._encode(pixel_values, plan)
        prompt = PromptImages(image_mask, embeds, extras, side_outputs={} if plan is None else plan.side_outputs)
        step_input, step_mask = tokens, attention_mask
        for _ in tqdm(range(max_new_tokens), disable=not verbose):
            logits = model.forward(step_input, return_type="logits", attention_mask=step_mask,
                                   past_kv_cache=cache, prompt_images=prompt)
            final = logits[:, -1, :]
            if do_sample:
                next_tok = sample_logits(final, top_k=top_k, top_p=top_p, temperature=temperature,
                                         tokens=tokens)
            else:
                next_tok = final.argmax(dim=-1)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad_id), next_tok)
            tokens = torch.cat([tokens, next_tok[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tok[:, None])], dim=1)
            if stop_at_eos and stop is not None:
                finished |= torch.isin(next_tok, stop)
                if finished.all():
                    break
            if use_past_kv_cache:
                step_input, step_mask = next_tok[:, None], torch.ones_like(next_tok[:, None])
            else:
                step_input, step_mask = tokens, attention_mask
    return _format(model, tokens, prompt_len, return_type)


def _format(model: HookedVLM, tokens: torch.Tensor, prompt_len: int, return_type: str) -> Any:
    if return_type == "tokens":
        return tokens
    if return_type == "new_tokens":
        return tokens[:, prompt_len:]
    rows = tokens[:, prompt_len:] if return_type == "new_str" else tokens
    out = []
    for row in rows.tolist():
        collapsed = [t for i, t in enumerate(row)
                     if not (t == model.image_token_id and i > 0 and row[i - 1] == model.image_token_id)]
        out.append(model.tokenizer.decode(collapsed, skip_special_tokens=False))
    return out
