"""Tiny seeded Qwen3-VL models and processors (no downloads).

4-px patches merged 2x2 (one token per 8x8 px), a 3-block vision tower with a 4x4 learned position table
(resampled to every grid) whose blocks 0 and 1 feed deepstack mergers, and a 3-layer Qwen3 LM (q/k norms,
grouped-query attention, head_dim 16 != hidden / heads = 8) with interleaved M-RoPE sections (2, 3, 3). The
deepstack features enter after LM layers 0 and 1; layer 2 has none. The processor is transformers' own with
the PIL image processor (no torchvision) and the tokenizer of ``qwen2_5_vl.testing``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlm_lens.architectures.qwen2_5_vl.testing import (
    IMAGE,
    IMAGE_TOKEN_ID,
    MERGE,
    PATCH,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_tokenizer,
)
from vlm_lens.architectures.qwen3_vl.processor import Qwen3VLImageProcessor
from vlm_lens.testing import VOCAB_SIZE, Case, draw_inputs, draw_text, randomise_constants, seeded_image

__all__ = ["ATOL", "CHAT_TEMPLATE", "IMAGE", "IMAGE_TOKEN_ID", "PROMPTS", "SIZES", "VISION_END_ID",
           "VISION_START_ID", "case_strategy", "hf_inputs", "image", "make_hf", "make_processor", "save_qwen3",
           "tiny_qwen3_config"]

# Two images in the first prompt, one in the second: the batch is padded on the left.
PROMPTS = [f"USER : {IMAGE} and {IMAGE} what is this ? ASSISTANT :", f"USER : {IMAGE} describe ASSISTANT :"]
# (height, width) -> patch grid: (20, 30) -> 4x8 patches (2x4 tokens); (40, 24) -> 10x6 (5x3 tokens);
# (16, 16) -> 4x4 (2x2 tokens). Every grid differs from the 4x4 position table but (16, 16).
SIZES = {"wide": (20, 30), "tall": (40, 24), "square": (16, 16)}
ATOL = 1e-4
CHAT_TEMPLATE = (
    "{% for m in messages %}USER : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)


def tiny_qwen3_config(text_overrides: dict | None = None, **vision_overrides) -> Qwen3VLConfig:
    """initializer_range=0.1 (HF: 0.02) so that positions and deepstack move the logits far above ATOL.
    ``text_overrides``: overrides of the text config."""
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    text.update(text_overrides or {})
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh", initializer_range=0.1)
    vision.update(vision_overrides)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                         video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                         vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)


def make_hf(config: Qwen3VLConfig, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    return randomise_constants(Qwen3VLForConditionalGeneration(config))


def make_processor() -> Qwen3VLImageProcessor:
    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                               size={"shortest_edge": 8 * 8, "longest_edge": 48 * 48})
    return Qwen3VLImageProcessor(image_processor, make_tokenizer(), chat_template=CHAT_TEMPLATE)


def save_qwen3(tmp_path: Path, config: Qwen3VLConfig | None = None, seed: int = 0):
    """Save a seeded HF model and its processor as on the hub; returns (path, hf_model)."""
    model = make_hf(config or tiny_qwen3_config(), seed)
    model.save_pretrained(tmp_path)
    make_processor().save_pretrained(tmp_path)
    # as on the hub: the stock processor class and a video processor config (which needs torchvision)
    cfg_file = tmp_path / "processor_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "processor_class": "Qwen3VLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}))
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs) -> dict:
    """HF forward/generate arguments for a ``VLMInputs`` (mm_token_type_ids switch on HF's 3-D positions)."""
    return dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                image_grid_thw=inputs.extras["image_grid_thw"],
                mm_token_type_ids=(inputs.tokens == IMAGE_TOKEN_ID).long())


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Qwen3-VL configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Qwen3 LM's width, depth (1-3), grouped-query ratio, head width (independent of width / heads)
    and interleaved M-RoPE sections (any split, empty sections included), the tower's depth, width and heads,
    the learned position table's side (1-6, resampled to every grid) and which blocks feed deepstack (an
    increasing subset, no more than the LM has layers); inputs: 1-2 prompts of 1-2 images, each of any size and
    aspect ratio in 8-48 px, left or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        text["num_hidden_layers"] = draw(st.integers(1, 3))
        text["head_dim"] = draw(st.sampled_from([4, 8, 16]))
        half = text["head_dim"] // 2  # rotary frequencies per head
        frames = draw(st.integers(0, half))
        rows = draw(st.integers(0, half - frames))
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                   "mrope_section": [frames, rows, half - frames - rows]}
        text["intermediate_size"] = 2 * text["hidden_size"]
        depth = draw(st.integers(1, 3))
        deepstack = draw(st.lists(st.integers(0, depth - 1), max_size=min(depth, text["num_hidden_layers"]),
                                  unique=True))
        width = draw(st.sampled_from([16, 32]))
        vision = dict(depth=depth, hidden_size=width, intermediate_size=2 * width,
                      num_heads=draw(st.sampled_from([1, 2, 4])),
                      num_position_embeddings=draw(st.integers(1, 6)) ** 2, deepstack_visual_indexes=sorted(deepstack))
        config = tiny_qwen3_config(text, **vision, out_hidden_size=text["hidden_size"])
        return Case(family="qwen3_vl", choices=dict(text=text, vision=vision), **draw_inputs(draw, IMAGE),
                    save=partial(save_qwen3, config=config), hf_inputs=hf_inputs)

    return cases()
