"""Tiny seeded Qwen2.5-VL models and processors (no downloads).

4-px patches merged 2x2 (one token per 8x8 px), 16-px attention windows (2x2 merged tokens), a 3-block
vision tower whose middle block attends over the whole image, and a 2-layer Qwen2 LM with grouped-query
attention and M-RoPE sections (2, 3, 3) over 16-dim heads. The processor is transformers' own, with the
PIL image processor (no torchvision).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlm_lens.architectures.qwen2_5_vl.processor import Qwen2_5_VLImageProcessor
from vlm_lens.testing import (
    VOCAB_SIZE,
    WORDS,
    Case,
    draw_inputs,
    draw_text,
    randomise_constants,
    seeded_image,
)

MARKERS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
SPECIAL = ["<pad>", "<s>", "</s>", "<|image_pad|>", "<unk>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID, VIDEO_TOKEN_ID = 3, 5, 6, 7
PATCH, MERGE = 4, 2
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"USER : {IMAGE} what is this ? ASSISTANT :", f"USER : {IMAGE} describe ASSISTANT :"]
# (height, width) -> processor grid (1, h, w): (20, 30) -> 4x8 patches (2x4 tokens, two full windows);
# (40, 24) -> 10x6 patches (5x3 tokens: windows of 2x2, 2x1, 1x2 and 1x1 tokens).
SIZES = {"wide": (20, 30), "tall": (40, 24), "square": (16, 16)}
ATOL = 1e-4


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Split(":", behavior="isolated"), pre_tokenizers.Split("?", behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=MARKERS)  # Qwen prepends no BOS


# The 2-layer Qwen2 language model with grouped-query attention and M-RoPE (Qwen2-VL's tests use it too).
TINY_TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)


def tiny_qwen_config(text: dict | None = None, **vision_overrides) -> Qwen2_5_VLConfig:
    """initializer_range=0.1 (HF: 0.02) so that positions and windows move the logits by ~0.3, far above ATOL.
    ``text``: overrides of the text config."""
    text = {**dict(TINY_TEXT, rope_parameters=dict(TINY_TEXT["rope_parameters"])), **(text or {})}
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=16, out_hidden_size=32,
                  fullatt_block_indexes=[1], hidden_act="silu", initializer_range=0.1)
    vision.update(vision_overrides)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                            video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                            vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)


def make_hf(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return randomise_constants(Qwen2_5_VLForConditionalGeneration(config))


def make_processor() -> Qwen2_5_VLImageProcessor:
    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                               size={"shortest_edge": 8 * 8, "longest_edge": 48 * 48})
    return Qwen2_5_VLImageProcessor(image_processor, make_tokenizer())


def save_qwen(tmp_path: Path, config: Qwen2_5_VLConfig | None = None, seed: int = 0):
    """Save a seeded HF model and its processor; returns (path, hf_model)."""
    model = make_hf(config or tiny_qwen_config(), seed)
    model.save_pretrained(tmp_path)
    make_processor().save_pretrained(tmp_path)
    # as on the hub: the stock processor class and a video processor config (which needs torchvision)
    cfg_file = tmp_path / "processor_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "processor_class": "Qwen2_5_VLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs) -> dict:
    """HF forward/generate arguments for a ``VLMInputs`` (mm_token_type_ids switch on HF's 3-D positions)."""
    return dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                image_grid_thw=inputs.extras["image_grid_thw"],
                mm_token_type_ids=(inputs.tokens == IMAGE_TOKEN_ID).long())


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Qwen2.5-VL configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Qwen2 LM's width, depth, grouped-query ratio and M-RoPE sections (any split of the rotary
    frequencies over time, rows and columns, empty sections included), the tower's depth, width, heads,
    attention window (1x1 to 4x4 merged tokens) and which blocks attend globally; inputs: 1-2 prompts of
    1-2 images, each of any size and aspect ratio in 8-48 px, left or right padding, float32 or bfloat16.
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
        depth = draw(st.integers(1, 3))
        vision = dict(depth=depth, hidden_size=draw(st.sampled_from([16, 32])), num_heads=draw(st.sampled_from([1, 2, 4])),
                      window_size=draw(st.sampled_from([8, 16, 32])),
                      fullatt_block_indexes=draw(st.lists(st.integers(0, depth - 1), max_size=depth, unique=True)))
        vision["intermediate_size"] = 2 * vision["hidden_size"]
        config = tiny_qwen_config(text, **vision, out_hidden_size=text["hidden_size"])
        return Case(family="qwen2_5_vl", choices=dict(text=text, vision=vision), **draw_inputs(draw, IMAGE),
                    save=partial(save_qwen, config=config), hf_inputs=hf_inputs)

    return cases()
