"""Tiny seeded Mistral 3 models and processors (no downloads).

A 3-block Pixtral tower on 4-px patches (8 px per merged token, images up to 32 px a side), 2x2 patch merger,
and a 2-layer Mistral language model with grouped-query attention and head_dim 16 != hidden / heads. The
processor is ``PixtralImagesProcessor`` over transformers' PIL image processor, saved as on the hub
(``processor_config.json`` naming ``PixtralProcessor``, ``preprocessor_config.json`` naming
``PixtralImageProcessor``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from vlm_lens.architectures.pixtral.processor import PixtralImagesProcessor
from vlm_lens.testing import VOCAB_SIZE, WORDS, randomise_constants, seeded_image

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


def make_processor() -> PixtralImagesProcessor:
    image_processor = PixtralImageProcessorPil(patch_size={"height": PATCH, "width": PATCH},
                                               size={"longest_edge": LONGEST})
    return PixtralImagesProcessor(image_processor, make_tokenizer(), patch_size=PATCH, spatial_merge_size=MERGE)


def save_mistral3(tmp_path: Path, config: Mistral3Config | None = None, seed: int = 0):
    """Save a seeded HF model and its processor as on the hub; returns (path, hf_model)."""
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    make_processor().save_pretrained(tmp_path)
    # as on the hub (Mistral-Small-3.1, Pixtral-12B): the image processor in its own preprocessor_config.json
    processor_file = tmp_path / "processor_config.json"
    settings = json.loads(processor_file.read_text())
    image_settings = settings.pop("image_processor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**image_settings, "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor"}))
    processor_file.write_text(json.dumps({**settings, "processor_class": "PixtralProcessor"}))
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs) -> dict:
    """HF forward/generate arguments for a ``VLMInputs``."""
    return dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                image_sizes=inputs.extras["image_sizes"])
