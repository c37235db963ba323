"""Small seeded model factories shared by the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

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


def make_processor(image_size: int = 16, patch_size: int = 4, strategy: str = "default") -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
    )


TEXT_CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**dict(num_key_value_heads=2), **kw}),
    "mistral": lambda **kw: MistralConfig(**{**dict(num_key_value_heads=2, sliding_window=None), **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**dict(num_key_value_heads=2), **kw}),
}


def tiny_llava_config(lm: str = "llama", **overrides) -> LlavaConfig:
    """A LLaVA-1.5-shaped config small enough for CPU tests; keyword overrides go to LlavaConfig."""
    text = TEXT_CONFIGS[lm](
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
    )
    kwargs = dict(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", multimodal_projector_bias=True,
    )
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def make_hf_llava(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # HF initialises some weights to constants (norms = 1, biases = 0); randomise so parity means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_llava(tmp_path: Path, config: LlavaConfig | None = None, seed: int = 0,
               with_processor: bool = True) -> tuple[Path, LlavaForConditionalGeneration]:
    config = config or tiny_llava_config()
    model = make_hf_llava(config, seed)
    model.save_pretrained(tmp_path)
    if with_processor:
        strategy = config.vision_feature_select_strategy
        make_processor(config.vision_config.image_size, config.vision_config.patch_size, strategy).save_pretrained(tmp_path)
    return tmp_path, model


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
