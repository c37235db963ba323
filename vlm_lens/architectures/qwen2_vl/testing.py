"""Tiny seeded Qwen2-VL models and processors (no downloads).

4-px patches merged 2x2 (one token per 8x8 px), a 2-block vision tower (width 16, quick-GELU MLP of 32) and
Qwen2.5-VL's test language model (2 Qwen2 layers, grouped-query attention, M-RoPE sections (2, 3, 3)). The
tokenizer, prompts and image sizes are Qwen2.5-VL's (``vlm_lens.architectures.qwen2_5_vl.testing``); the
processor is transformers' own with the PIL image processor (no torchvision) and a Qwen-style chat template.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlm_lens.architectures.qwen2_5_vl.testing import (
    IMAGE,
    IMAGE_TOKEN_ID,
    MERGE,
    PATCH,
    TINY_TEXT,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    hf_inputs,
    make_tokenizer,
)
from vlm_lens.architectures.qwen2_vl.processor import Qwen2VLImageProcessor
from vlm_lens.testing import Case, draw_inputs, draw_text, randomise_constants, seeded_image

# Qwen's template, cut to the tiny vocabulary: each image is <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }} : {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def tiny_qwen2_vl_config(text: dict | None = None, **vision_overrides) -> Qwen2VLConfig:
    """initializer_range=0.1 (HF: 0.02) so that positions and images move the logits well above ATOL.
    ``text``: overrides of the text config."""
    text = {**dict(TINY_TEXT, rope_parameters=dict(TINY_TEXT["rope_parameters"])), **(text or {})}
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, hidden_act="quick_gelu", initializer_range=0.1)
    vision.update(vision_overrides)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                         video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                         vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)


def make_hf(config: Qwen2VLConfig, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    return randomise_constants(Qwen2VLForConditionalGeneration(config))


def make_processor() -> Qwen2VLImageProcessor:
    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                               size={"shortest_edge": 8 * 8, "longest_edge": 48 * 48})
    return Qwen2VLImageProcessor(image_processor, make_tokenizer(), chat_template=CHAT_TEMPLATE)


def save_qwen2_vl(tmp_path: Path, config: Qwen2VLConfig | None = None, seed: int = 0):
    """Save a seeded HF model and its processor laid out as on the hub; returns (path, hf_model)."""
    model = make_hf(config or tiny_qwen2_vl_config(), seed)
    model.save_pretrained(tmp_path)
    make_processor().save_pretrained(tmp_path)
    # as on the hub: the stock processor class and a video processor config (which needs torchvision)
    cfg_file = tmp_path / "processor_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "processor_class": "Qwen2VLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"}))
    return tmp_path, model


image = seeded_image


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Qwen2-VL configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Qwen2 LM's width, depth, grouped-query ratio and M-RoPE sections (any split of the rotary
    frequencies over time, rows and columns, empty sections included), the tower's depth, width, heads and MLP
    ratio; inputs: 1-2 prompts of 1-2 images, each of any size and aspect ratio in 8-48 px, left or right
    padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary frequencies per head
        frames = draw(st.integers(0, half))
        rows = draw(st.integers(0, half - frames))
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [frames, rows, half - frames - rows]}
        text["intermediate_size"] = 2 * text["hidden_size"]
        vision = dict(depth=draw(st.integers(1, 3)), embed_dim=draw(st.sampled_from([16, 32])),
                      num_heads=draw(st.sampled_from([1, 2, 4])), mlp_ratio=draw(st.sampled_from([1, 2, 4])))
        config = tiny_qwen2_vl_config(text, **vision, hidden_size=text["hidden_size"])
        return Case(family="qwen2_vl", choices=dict(text=text, vision=vision), **draw_inputs(draw, IMAGE),
                    save=partial(save_qwen2_vl, config=config), hf_inputs=hf_inputs)

    return cases()
