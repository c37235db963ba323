"""Tiny seeded Mistral 3 models and processors (no downloads).

A 3-block Pixtral tower on 4-px patches (8 px per merged token, images up to 32 px a side), 2x2 patch merger,
and a 2-layer Mistral language model with grouped-query attention and head_dim 16 != hidden / heads. The
processor is ``PixtralImagesProcessor`` over transformers' PIL image processor, saved as on the hub
(``processor_config.json`` naming ``PixtralProcessor``, ``preprocessor_config.json`` naming
``PixtralImageProcessor``).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from vlm_lens.architectures.pixtral.processor import PixtralImagesProcessor
from vlm_lens.testing import (
    VOCAB_SIZE,
    WORDS,
    Case,
    draw_feature_layer,
    draw_inputs,
    draw_text,
    randomise_constants,
    seeded_image,
)

SPECIAL = ["<pad>", "<s>", "</s>", "[IMG]", "<unk>", "[IMG_BREAK]", "[IMG_END]"]
PAD_ID, BOS_ID, EOS_ID, IMAGE_TOKEN_ID, _, BREAK_ID, END_ID = range(7)
PATCH, MERGE, LONGEST = 4, 2, 32
PROMPTS = ["USER : [IMG] what is this ? ASSISTANT :", "USER : [IMG] [IMG] describe ASSISTANT :"]
# (height, width) -> processed size, multiples of 8 px, longest edge <= 32: (20, 30) -> 24x32 (3x4 tokens);
# (40, 24) -> 32x19 -> 32x24 (4x3 tokens); (16, 16) -> 2x2 tokens.
SIZES = {"wide": (20, 30), "tall": (40, 24), "square": (16, 16)}
ATOL = 1e-4


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Split(":", behavior="isolated"), pre_tokenizers.Split("?", behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[3:4] + SPECIAL[5:])


def tiny_mistral3_config(**overrides) -> Mistral3Config:
    """initializer_range=0.1 (HF: 0.02) so that positions and the image blocks move the logits far above ATOL."""
    text = dict(model_type="mistral", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=0.1)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=2, image_size=LONGEST, patch_size=PATCH, hidden_act="gelu",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}, initializer_range=0.1)
    kwargs = dict(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID,
                  spatial_merge_size=MERGE, vision_feature_layer=-1, projector_hidden_act="gelu",
                  multimodal_projector_bias=False, tie_word_embeddings=False)
    kwargs.update(overrides)
    return Mistral3Config(**kwargs)


def make_hf(config: Mistral3Config | None = None, seed: int = 0) -> Mistral3ForConditionalGeneration:
    torch.manual_seed(seed)
    return randomise_constants(Mistral3ForConditionalGeneration(config or tiny_mistral3_config()))


def make_processor(config: Any = None) -> PixtralImagesProcessor:
    """The processor for an HF config's patch size, merge size and longest edge (default: the tiny Mistral 3's); a
    ``LlavaConfig`` with a Pixtral tower has no ``spatial_merge_size``: one token per patch."""
    config = config or tiny_mistral3_config()
    patch, longest = config.vision_config.patch_size, config.vision_config.image_size
    image_processor = PixtralImageProcessorPil(patch_size={"height": patch, "width": patch},
                                               size={"longest_edge": longest})
    return PixtralImagesProcessor(image_processor, make_tokenizer(), patch_size=patch,
                                  spatial_merge_size=getattr(config, "spatial_merge_size", 1))


def save_with_processor(tmp_path: Path, model: Any) -> tuple[Path, Any]:
    """Save an HF model on a Pixtral tower and its processor as on the hub; returns (path, model)."""
    model.save_pretrained(tmp_path)
    make_processor(model.config).save_pretrained(tmp_path)
    # as on the hub (Mistral-Small-3.1, Pixtral-12B): the image processor in its own preprocessor_config.json
    processor_file = tmp_path / "processor_config.json"
    settings = json.loads(processor_file.read_text())
    image_settings = settings.pop("image_processor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**image_settings, "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor"}))
    processor_file.write_text(json.dumps({**settings, "processor_class": "PixtralProcessor"}))
    return tmp_path, model


def save_mistral3(tmp_path: Path, config: Mistral3Config | None = None, seed: int = 0):
    """Save a seeded HF model and its processor as on the hub; returns (path, hf_model)."""
    return save_with_processor(tmp_path, make_hf(config, seed))


image = seeded_image


def hf_inputs(inputs) -> dict:
    """HF forward/generate arguments for a ``VLMInputs``."""
    return dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                image_sizes=inputs.extras["image_sizes"])


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Mistral 3 configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Mistral LM's width, depth, grouped-query ratio and head size (equal to hidden / heads or not),
    the Pixtral tower's depth, width, heads, patch size and longest edge (16 or 32 px), the feature layer,
    the patch merger (1x1 or 2x2) and the projector bias; inputs: 1-2 prompts of 1-2 images, each of any
    size and aspect ratio in 16-48 px (resized to the longest edge, in whole tokens), left or right padding,
    float32 or bfloat16.

    Images start at 16 px: transformers' Mistral 3 fails on a batch whose images make one token in all
    (``get_image_features`` squeezes the [1, dim] features to [dim], then cannot split them per image).
    """
    from hypothesis import assume
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        text["head_dim"] = draw(st.sampled_from([8, 16]))
        vision = dict(num_hidden_layers=draw(st.integers(1, 3)), hidden_size=draw(st.sampled_from([16, 32])),
                      num_attention_heads=draw(st.sampled_from([2, 4])), patch_size=draw(st.sampled_from([2, 4])),
                      image_size=draw(st.sampled_from([16, 32])))
        merge = draw(st.sampled_from([1, 2]))
        assume(vision["image_size"] // (vision["patch_size"] * merge) <= 8)  # up to 8x8 tokens an image
        choices = dict(text=text, vision=vision, spatial_merge_size=merge,
                       vision_feature_layer=draw_feature_layer(draw, vision["num_hidden_layers"], allow_list=False),
                       multimodal_projector_bias=draw(st.booleans()))
        base = tiny_mistral3_config()
        text_config = {**base.text_config.to_dict(), **text, "intermediate_size": 2 * text["hidden_size"]}
        vision_config = {**base.vision_config.to_dict(), **vision, "intermediate_size": 2 * vision["hidden_size"],
                         "head_dim": vision["hidden_size"] // vision["num_attention_heads"]}
        config = tiny_mistral3_config(text_config=text_config, vision_config=vision_config,
                                      **{k: v for k, v in choices.items() if k not in ("text", "vision")})
        return Case(family="pixtral", choices=choices, **draw_inputs(draw, "[IMG]", size_range=(16, 48)),
                    save=partial(save_mistral3, config=config), hf_inputs=hf_inputs)

    return cases()
