"""Tiny seeded models for tests, benchmarks and examples (no downloads).

What the families share lives here (a word-level tokenizer, text configs, seeded weights, random
inputs); each family's own factories and its hypothesis strategy are in
``vlm_lens/architectures/<family>/testing.py``. Importing this needs no test framework.
"""

from __future__ import annotations

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
