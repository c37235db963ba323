"""Tiny seeded InternVL checkpoints and processors for tests (no downloads).

16-px tiles of 4-px patches (4x4 patches and a CLS token) pixel-shuffled by 2: a tile is 2x2 = 4 image tokens.
The image processor cuts an image into at most 4 crops of 16 px plus a thumbnail, by aspect ratio: a wide
image 1x2 crops, a tall one 2x1, a square one 2x2; a small one is a single tile. The language model is a
2-layer Qwen2 with grouped-query attention. Saved as on the hub: ``InternVLProcessor`` in
``processor_config.json``, ``GotOcr2ImageProcessorFast`` in ``preprocessor_config.json`` and a video
processor config (which needs torchvision).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from vlm_lens.architectures.internvl.processor import InternVLImagesOnlyProcessor
from vlm_lens.testing import (
    WORDS,
    Case,
    draw_feature_layer,
    draw_inputs,
    draw_text,
    randomise_constants,
    seeded_image,
)

IMAGE, START, END, VIDEO = "<IMG_CONTEXT>", "<img>", "</img>", "<video>"
SPECIAL = ["<pad>", "<s>", "</s>", IMAGE, "<unk>", START, END, VIDEO]
IMAGE_TOKEN_ID, START_ID, END_ID = 3, 5, 6
VOCAB_SIZE = 48
TILE, PATCH, SCALE = 16, 4, 2
TOKENS_PER_TILE = (TILE // PATCH // SCALE) ** 2
PROMPTS = [f"USER : {IMAGE} what is this ? ASSISTANT :", f"USER : {IMAGE} describe ASSISTANT :"]
# (height, width) -> tiles: wide 1x2 crops, tall 2x1, square 2x2 (each plus a thumbnail); small: one tile
SIZES = {"wide": (12, 30), "tall": (40, 20), "square": (24, 24), "small": (10, 12)}
ATOL = 1e-4
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER :{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <IMG_CONTEXT>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, no BOS (Qwen2), the processor's marker tokens as named special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Split(":", behavior="isolated"), pre_tokenizers.Split("?", behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"start_image_token": START, "end_image_token": END, "context_image_token": IMAGE,
                              "video_token": VIDEO})


def tiny_config(text: dict | None = None, **vision_overrides) -> InternVLConfig:
    """initializer_range=0.1 (HF: 0.02) so that positions, tiles and layer scales move the logits well above ATOL."""
    text_config = dict(model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=2, initializer_range=0.1,
                       tie_word_embeddings=True)
    text_config.update(text or {})
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
                  patch_size=PATCH, attention_bias=True, initializer_range=0.1)
    vision.update(vision_overrides)
    return InternVLConfig(text_config=text_config, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                          image_seq_length=TOKENS_PER_TILE, downsample_ratio=1 / SCALE)


def make_hf(config: InternVLConfig, seed: int = 0) -> InternVLForConditionalGeneration:
    """HF sets the CLS token and position embeddings to 0 and the layer scales to one value: seeded noise on them."""
    torch.manual_seed(seed)
    return randomise_constants(InternVLForConditionalGeneration(config),
                               names=("norm", "lambda_", "cls_token", "position_embeddings"))


def make_processor(resample: int | None = None, tokens_per_tile: int = TOKENS_PER_TILE,
                   max_patches: int = 4) -> InternVLImagesOnlyProcessor:
    """The checkpoint's processor with the PIL image processor (``resample``: a PIL filter id; HF's: bicubic;
    ``max_patches``: the most crops an image is cut into, besides its thumbnail)."""
    kwargs = dict(size={"height": TILE, "width": TILE}, max_patches=max_patches)
    if resample is not None:
        kwargs["resample"] = resample
    return InternVLImagesOnlyProcessor(GotOcr2ImageProcessorPil(**kwargs), make_tokenizer(),
                                       image_seq_length=tokens_per_tile, chat_template=CHAT_TEMPLATE)


def save_model(tmp_path: Path, config: InternVLConfig | None = None, seed: int = 0, resample: int | None = None,
               max_patches: int = 4):
    """Save a seeded HF model and its processor as a hub checkpoint looks; returns (path, hf_model)."""
    model = make_hf(config or tiny_config(), seed)
    model.save_pretrained(tmp_path)
    vision = model.config.vision_config
    side = round(vision.image_size[0] // vision.patch_size[0] * model.config.downsample_ratio)
    make_processor(resample, side**2, max_patches).save_pretrained(tmp_path)
    # as on the hub: the image processor's settings apart (the fast class, which needs torchvision), the stock
    # processor class, and a video processor config (which needs torchvision too)
    cfg_file = tmp_path / "processor_config.json"
    settings = json.loads(cfg_file.read_text())
    image_settings = {**settings.pop("image_processor"), "image_processor_type": "GotOcr2ImageProcessorFast",
                      "processor_class": "InternVLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_settings))
    cfg_file.write_text(json.dumps({**settings, "processor_class": "InternVLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "InternVLVideoProcessor", "processor_class": "InternVLProcessor"}))
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs, padded: bool = True) -> dict:
    """HF forward arguments for a ``VLMInputs`` (left padding needs explicit positions in HF's forward)."""
    kwargs = dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values)
    if padded:
        kwargs["position_ids"] = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


def case_strategy() -> Any:
    """Hypothesis strategy over tiny InternVL configurations and inputs (``vlm_lens.testing.Case``).

    Varies the LM (Qwen2 or Llama), its width, depth, grouped-query ratio and tied embeddings; InternViT's
    depth, width, heads, norm (LayerNorm or RMSNorm), qk-norm, q/k/v bias, final norm (``use_mean_pooling``)
    and the layer read; the pixel shuffle (none or 2x2: 16 or 4 tokens a tile), the projector's activation and
    the most crops per image (1-6, plus a thumbnail); inputs: 1-2 prompts of 1-2 images of any size and aspect
    ratio in 8-48 px (one tile or a grid of crops), left or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        text.update(model_type=draw(st.sampled_from(["qwen2", "llama"])), intermediate_size=2 * text["hidden_size"],
                    tie_word_embeddings=draw(st.booleans()))
        depth = draw(st.integers(1, 3))
        hidden = draw(st.sampled_from([16, 32]))
        vision = dict(num_hidden_layers=depth, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_attention_heads=draw(st.sampled_from([1, 2, 4])),
                      norm_type=draw(st.sampled_from(["layer_norm", "rms_norm"])), use_qk_norm=draw(st.booleans()),
                      attention_bias=draw(st.booleans()), use_mean_pooling=draw(st.booleans()))
        top = dict(vision_feature_layer=draw_feature_layer(draw, depth, allow_list=False),
                   downsample_ratio=draw(st.sampled_from([1.0, 0.5])),
                   projector_hidden_act=draw(st.sampled_from(["gelu", "silu"])))
        max_patches = draw(st.integers(1, 6))
        config = tiny_config(text, **vision)
        for key, value in dict(top, image_seq_length=round(TILE // PATCH * top["downsample_ratio"]) ** 2).items():
            setattr(config, key, value)
        return Case(family="internvl", choices=dict(text=text, vision=vision, **top, max_patches=max_patches),
                    **draw_inputs(draw, IMAGE), save=partial(save_model, config=config, max_patches=max_patches),
                    hf_inputs=hf_inputs)

    return cases()
