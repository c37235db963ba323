"""Tiny seeded LLaVA-1.5 checkpoints for tests (no downloads), and a hypothesis strategy over configs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm_lens.testing import IMAGE_TOKEN_ID, TEXT_CONFIGS, VOCAB_SIZE, make_tokenizer, randomise_constants


def make_processor(image_size: int = 16, patch_size: int = 4, strategy: str = "default") -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
    )


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
    return randomise_constants(LlavaForConditionalGeneration(config))


def save_llava(tmp_path: Path, config: LlavaConfig | None = None, seed: int = 0,
               with_processor: bool = True) -> tuple[Path, LlavaForConditionalGeneration]:
    config = config or tiny_llava_config()
    model = make_hf_llava(config, seed)
    model.save_pretrained(tmp_path)
    if with_processor:
        strategy = config.vision_feature_select_strategy
        make_processor(config.vision_config.image_size, config.vision_config.patch_size, strategy).save_pretrained(tmp_path)
    return tmp_path, model
