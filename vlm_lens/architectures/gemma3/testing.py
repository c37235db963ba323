"""Tiny seeded Gemma 3 models and processors (no downloads).

A 2-block SigLIP tower on 24-px tiles of 4-px patches (a 6x6 patch grid) pooled 2x2 to 3x3 = 9 image
tokens, and a 3-layer Gemma 3 language model: local, global, local layers with a 6-token sliding window
(shorter than an image's 9 tokens, so the window cuts through the image block), grouped-query attention
with q/k norms, rotary bases 1e4 (local) and 1e6 with linear scaling 8 (global), and an attention scale
1/sqrt(24) that differs from 1/sqrt(head_dim). The processor is transformers' own, with the PIL image
processor, saved as on the hub (``processor_config.json`` + ``preprocessor_config.json``).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from vlm_lens.architectures.gemma3.processor import Gemma3FlatProcessor
from vlm_lens.testing import (
    VOCAB_SIZE,
    WORDS,
    Case,
    draw_inputs,
    draw_text,
    randomise_constants,
    seeded_image,
)

SPECIAL = ["<pad>", "<eos>", "<bos>", "<image_soft_token>", "<unk>", "<start_of_image>", "<end_of_image>",
           "<start_of_turn>", "<end_of_turn>", "\n\n", "user", "model"]
PAD_ID, EOS_ID, BOS_ID, IMAGE_TOKEN_ID, _, BOI_ID, EOI_ID = range(7)
BOI = "<start_of_image>"
TILE, PATCH, TOKENS = 24, 4, 9
PROMPTS = [f"USER : {BOI} what is this ? ASSISTANT :", f"USER : {BOI} {BOI} describe ASSISTANT :"]
# (height, width) of the test images: every one is stretched onto the 24x24 tile
SIZES = {"wide": (20, 30), "tall": (40, 24), "square": (16, 16)}
ATOL = 1e-4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'user' if m['role'] == 'user' else 'model' }}\n\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split("?", behavior="isolated")])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL[:9]])
    tok.add_tokens([AddedToken("\n\n", normalized=False)])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": BOI, "eoi_token": "<end_of_image>"},
    )


def tiny_gemma3_config(vision: dict | None = None, tokens: int = TOKENS, **text_overrides) -> Gemma3Config:
    """initializer_range=0.1 (HF: 0.02), so that the image-block mask moves the logits far above ATOL.
    ``vision``: overrides of the vision config; ``tokens``: image tokens per image (a square number)."""
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                sliding_window=6, query_pre_attn_scalar=24,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
                pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, initializer_range=0.1)
    text.update(text_overrides)
    vision = {**dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
                     patch_size=PATCH, vision_use_head=False, layer_norm_eps=1e-6), **(vision or {})}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                        image_token_index=IMAGE_TOKEN_ID, boi_token_index=BOI_ID, eoi_token_index=EOI_ID)


def make_hf(config: Gemma3Config | None = None, seed: int = 0) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config or tiny_gemma3_config())
    with torch.no_grad():  # HF initialises the projection to zeros (and Gemma's norms to 1 + 0)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return randomise_constants(model)


def make_processor(tile: int = TILE, tokens: int = TOKENS) -> Gemma3FlatProcessor:
    image_processor = Gemma3ImageProcessorPil(size={"height": tile, "width": tile})
    return Gemma3FlatProcessor(image_processor, make_tokenizer(), chat_template=CHAT_TEMPLATE, image_seq_length=tokens)


def save_gemma3(tmp_path: Path, config: Gemma3Config | None = None, seed: int = 0):
    """Save a seeded HF model and its processor as on the hub; returns (path, hf_model)."""
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    make_processor(model.config.vision_config.image_size, model.config.mm_tokens_per_image).save_pretrained(tmp_path)
    # as on the hub: the stock processor class, the image processor in its own preprocessor_config.json
    cfg_file = tmp_path / "processor_config.json"
    settings = json.loads(cfg_file.read_text())
    image_settings = settings.pop("image_processor", None)
    cfg_file.write_text(json.dumps({**settings, "processor_class": "Gemma3Processor"}))
    if image_settings is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(
            {**image_settings, "do_pan_and_scan": None, "processor_class": "Gemma3Processor"}))
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs) -> dict:
    """HF forward/generate arguments for a ``VLMInputs``; token_type_ids switch on HF's image-block mask."""
    return dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                token_type_ids=(inputs.tokens == IMAGE_TOKEN_ID).long())


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Gemma 3 configurations and inputs (``vlm_lens.testing.Case``).

    Varies the LM's width, depth, grouped-query ratio, head width and attention scale, each layer's type (local
    or global), the sliding window (1-10 tokens, shorter or longer than an image), the global layers' linear
    rope scaling and a ``final_logit_softcapping`` (which the vision-language model ignores); the tower's depth
    and width, its patch size and the pooling to 1-36 image tokens; inputs: 1-2 prompts of 1-2 images of any
    aspect ratio (each stretched onto the tile), left or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        n_layers = draw(st.integers(1, 3))
        text.update(
            num_hidden_layers=n_layers, intermediate_size=2 * text["hidden_size"],
            head_dim=draw(st.sampled_from([8, 16])), query_pre_attn_scalar=draw(st.sampled_from([8, 24])),
            layer_types=draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                      min_size=n_layers, max_size=n_layers)),
            sliding_window=draw(st.integers(1, 10)), final_logit_softcapping=draw(st.sampled_from([None, 2.0])),
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": draw(st.sampled_from([1.0, 8.0])),
                                                "rope_theta": 1e6}})
        patch = draw(st.sampled_from([4, 8]))  # a 6x6 or 3x3 patch grid on the 24-px tile
        side = draw(st.sampled_from([d for d in (1, 2, 3, 6) if (TILE // patch) % d == 0]))
        vision = dict(hidden_size=draw(st.sampled_from([16, 24])), num_hidden_layers=draw(st.integers(1, 2)),
                      num_attention_heads=draw(st.sampled_from([1, 2])), patch_size=patch)
        config = tiny_gemma3_config(dict(vision, intermediate_size=2 * vision["hidden_size"]), side**2, **text)
        return Case(family="gemma3", choices=dict(text=text, vision=vision, mm_tokens_per_image=side**2),
                    **draw_inputs(draw, BOI), save=partial(save_gemma3, config=config), hf_inputs=hf_inputs)

    return cases()
