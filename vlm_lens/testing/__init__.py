"""Tiny seeded models for tests, benchmarks and examples (no downloads).

What the families share lives here (a word-level tokenizer, text configs, seeded weights, random
inputs); each family's own factories and its hypothesis strategy are in
``vlm_lens/architectures/<family>/testing.py``. Importing this needs no test framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

WORDS = ["USER", "ASSISTANT", ":", "what", "is", "this", "?", "a", "cat", "dog", "red", "blue", "the",
         "colour", "shape", "yes", "no", "\n", "describe", "image", "please", "square", "circle"]
SPECIAL = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
IMAGE_TOKEN_ID = 3
VOCAB_SIZE = 48  # > len(SPECIAL) + len(WORDS): the LM vocabulary may exceed the tokenizer's


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Split(":", behavior="isolated"), pre_tokenizers.Split("?", behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT :{% endif %}"
    )
    return fast


TEXT_CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**dict(num_key_value_heads=2), **kw}),
    "mistral": lambda **kw: MistralConfig(**{**dict(num_key_value_heads=2, sliding_window=None), **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**dict(num_key_value_heads=2), **kw}),
}


def random_pixels(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def image_prompt_tokens(n_image_tokens: int, n_images: int = 1, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """[batch, pos] tokens: bos, some words, then each row's images' tokens, then more words."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        before = torch.randint(5, VOCAB_SIZE, (3,), generator=g)
        after = torch.randint(5, VOCAB_SIZE, (4,), generator=g)
        img = torch.full((n_image_tokens * n_images,), IMAGE_TOKEN_ID)
        rows.append(torch.cat([torch.tensor([1]), before, img, after]))
    return torch.stack(rows)


def randomise_constants(model: nn.Module, names: tuple[str, ...] = ("norm", "ln_q")) -> nn.Module:
    """HF initialises norms to 1 and biases to 0; add seeded noise to them so parity means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names) or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def seeded_image(size: tuple[int, int], seed: int = 0):
    """A PIL image of seeded noise, ``size`` = (height, width)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def perturb(value: torch.Tensor) -> torch.Tensor:
    """``value`` plus seeded noise on the scale of its finite entries."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(value.shape, generator=g, dtype=value.dtype)
    return value + noise * (value[torch.isfinite(value)].std() + 1e-2)


def assert_hooks_live(model, names, inputs, **forward_kwargs) -> None:
    """Every hook in ``names`` fires on ``model(inputs, **forward_kwargs)`` and perturbing its value moves the
    logits; raises AssertionError listing the silent and the dead ones."""
    with torch.no_grad():
        base = model(inputs, **forward_kwargs)
    dead, silent = [], []
    for name in names:
        fired = []

        def hook(value, hook, fired=fired):
            fired.append(hook.name)
            return perturb(value)

        with torch.no_grad():
            out = model.run_with_hooks(inputs, **forward_kwargs, fwd_hooks=[(name, hook)])
        if not fired:
            silent.append(name)
        elif torch.allclose(out, base, atol=1e-6):
            dead.append(name)
    assert not silent, f"hooks that never fired: {silent}"
    assert not dead, f"hooks whose change does not reach the logits: {dead}"


# ----------------------------------------------------------------------------------- property test cases
@dataclass(frozen=True)
class Case:
    """One drawn configuration for the property test (``tests/core/test_property.py``).

    ``save(folder)`` writes the seeded HF checkpoint and its processor and returns ``(folder, hf_model)``;
    ``hf_inputs(vlm_inputs)`` gives the HF forward arguments for the prepared inputs. ``choices`` holds
    what was drawn, so a failing example reads in one line.

    The strategies' annotations name bare containers: beartype (on under pytest) checks a parametrised one,
    ``tuple[str, ...]``, by sampling an item with the global ``random``, which hypothesis forbids in a draw.
    """

    family: str
    choices: dict  # what was drawn for the model
    prompts: tuple  # of str
    image_sizes: tuple  # per prompt, a tuple of each image's (height, width)
    padding_side: str
    dtype: torch.dtype
    save: Callable = field(repr=False)  # (folder: Path) -> (folder, hf_model)
    hf_inputs: Callable = field(repr=False)  # (VLMInputs) -> HF forward kwargs
    # (hf_model, VLMInputs) -> HF's [batch, pos, vocab] logits, for a family whose batch rows equal HF run row by
    # row rather than HF's own batched call (cross-attention models); None: ``hf(**hf_inputs(inputs)).logits``
    hf_logits: Callable | None = field(default=None, repr=False)
    # (VLMInputs) -> (row, start, end) of the sequence positions that stand for the last image, for a family whose
    # layout is not on the sequence (cross-attention: keys); None: the last layout span
    last_image_tokens: Callable | None = field(default=None, repr=False)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's report: the repr, not the config
        printer.text(repr(self))

    def reference_logits(self, hf: Any, inputs: Any) -> torch.Tensor:
        """HF's logits for the prepared inputs, as the family's batch semantics define them."""
        if self.hf_logits is not None:
            return self.hf_logits(hf, inputs)
        return hf(**self.hf_inputs(inputs)).logits

    def last_image_positions(self, inputs: Any) -> tuple[int, int, int]:
        """(row, start, end): the token positions of the last image in the prepared inputs."""
        if self.last_image_tokens is not None:
            return self.last_image_tokens(inputs)
        span = inputs.layout.spans[-1]
        return span.batch, span.start, span.end

    def images(self) -> list[list[Any]]:
        """Seeded PIL images of the drawn sizes, a different seed for each."""
        seeds = count()
        return [[seeded_image(size, seed=next(seeds)) for size in row] for row in self.image_sizes]


def draw_text(draw: Any, hidden: tuple = (16, 32)) -> dict:
    """Language-model shape: width, 1-2 layers, and a grouped-query ratio (query heads, key/value heads)."""
    from hypothesis import strategies as st

    n_heads = draw(st.sampled_from([2, 4]))
    n_kv = draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0]))
    return dict(hidden_size=draw(st.sampled_from(hidden)), num_hidden_layers=draw(st.integers(1, 2)),
                num_attention_heads=n_heads, num_key_value_heads=n_kv)


def draw_feature_layer(draw: Any, n_layers: int, allow_list: bool = True) -> int | list:
    """An HF ``vision_feature_layer``: one index into the tower's ``n_layers + 1`` hidden states, or a list.

    Never the single int 0: transformers 5 passes ``vision_feature_layer`` on as ``output_hidden_states``,
    where 0 reads as False and HF's own forward fails; -(n_layers + 1) is the same hidden state.
    """
    from hypothesis import strategies as st

    index = st.integers(-(n_layers + 1), n_layers)
    if allow_list and draw(st.booleans()):
        return draw(st.lists(index, min_size=2, max_size=3))
    return draw(index.filter(lambda i: i != 0))


def draw_inputs(draw: Any, placeholder: str, max_images: int = 2, size_range: tuple = (8, 48)) -> dict:
    """1-2 prompts of different lengths with 1..``max_images`` placeholders each, image sizes (any aspect
    ratio within ``size_range``), padding side and dtype: the ``Case`` fields that are not the model."""
    from hypothesis import strategies as st

    batch = draw(st.integers(1, 2))
    side = st.integers(*size_range)
    prompts, sizes = [], []
    for _ in range(batch):
        n_images = draw(st.integers(1, max_images))
        words = draw(st.lists(st.sampled_from(WORDS[3:17]), min_size=1, max_size=4))
        prompts.append(f"USER : {(placeholder + ' ') * n_images}{' '.join(words)} ASSISTANT :")
        sizes.append(tuple((draw(side), draw(side)) for _ in range(n_images)))
    return dict(prompts=tuple(prompts), image_sizes=tuple(sizes), padding_side=draw(st.sampled_from(["left", "right"])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])))


def padded_hf_inputs(inputs: Any) -> dict:
    """HF forward arguments for a LLaVA-line ``VLMInputs``: HF's language model counts positions from the
    first column, so padded rows get explicit ``position_ids``."""
    return dict(input_ids=inputs.tokens, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
                position_ids=(inputs.attention_mask.cumsum(-1) - 1).clamp(min=0), **inputs.extras)


def assert_language_model_matches_hf(model, cache, logits, hidden_states, hf_logits, mask, atol: float = 1e-4) -> None:
    """The merged embeddings, every ``resid_post`` and the logits equal HF's at the positions in ``mask``
    ([batch, pos] bool: the real tokens). ``hidden_states``: HF's ``output_hidden_states`` (the last one is
    after the final norm, so the last block is compared through ``model.ln_final``)."""
    from vlm_lens.hook_names import act_name

    def worst(ours: torch.Tensor, ref: torch.Tensor) -> float:
        return float((ours[mask] - ref[mask]).abs().max())

    assert worst(cache["hook_embed"], hidden_states[0]) <= atol, "hook_embed"
    n = model.cfg.n_layers
    for layer in range(n - 1):
        diff = worst(cache[act_name("resid_post", layer)], hidden_states[layer + 1])
        assert diff <= atol, (act_name("resid_post", layer), diff)
    assert worst(model.ln_final(cache[act_name("resid_post", n - 1)]), hidden_states[-1]) <= atol, "ln_final"
    assert worst(logits, hf_logits) <= atol, "logits"


def real_positions(x: torch.Tensor, inputs) -> torch.Tensor:
    """``x`` [batch, pos, ...] at the real (non-padding) positions of ``inputs``."""
    return x[inputs.attention_mask.bool()]


def assert_image_attention(pattern: torch.Tensor, n_real: int) -> None:
    """A padded vision tower's pattern for one image ([heads, n, n]): its ``n_real`` patches read nothing past
    them, and each padding row attends to itself alone (``vlm_lens.vision.padding``)."""
    n = pattern.shape[-1]
    assert (pattern[:, :n_real, n_real:] == 0).all(), "a patch reads padding"
    eye = torch.eye(n, dtype=pattern.dtype, device=pattern.device)[n_real:]
    assert torch.equal(pattern[:, n_real:], eye.expand(pattern.shape[0], -1, -1)), "a padding row reads more than itself"
