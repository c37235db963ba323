"""Tiny seeded PaliGemma and PaliGemma 2 models and processors (no downloads).

A 2-block SigLIP tower on 16-px tiles of 4-px patches (a 4x4 grid: 16 image tokens per image) and a 2-layer
language model: Gemma (PaliGemma) or Gemma 2 (PaliGemma 2: local then global layer with a 6-token sliding
window, shorter than the image, attention scores soft-capped at 1.0 and logits at 2.0, so both caps move the
logits, and an attention scale 1/sqrt(24) that differs from 1/sqrt(head_dim)). The processor is transformers'
own ``PaliGemmaProcessor`` with the PIL SigLIP image processor, saved as on the hub.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vlm_lens.architectures.paligemma.processor import PaliGemmaFlatProcessor
from vlm_lens.testing import WORDS, Case, draw_inputs, draw_text, randomise_constants, seeded_image

SPECIAL = ["<pad>", "<eos>", "<bos>", "<image>", "<unk>", "\n"]
PAD_ID, EOS_ID, BOS_ID, IMAGE_TOKEN_ID, UNK_ID, NEWLINE_ID = range(6)
VOCAB_SIZE = 48  # the tokenizer has 6 + 23 words; PaliGemma's processor adds 1152 <locXXXX>/<segXXX> after them
TILE, PATCH, TOKENS = 16, 4, 16
PROMPTS = ["<image> what is this ?", "<image> <image> describe the image"]
SIZES = {"wide": (20, 30), "tall": (40, 24), "square": (16, 16)}
ATOL = 1e-4


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in WORDS if w != "\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split("?", behavior="isolated")])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL[:5]])
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def tiny_paligemma_config(version: int = 1, vision: dict | None = None, **text_overrides) -> PaliGemmaConfig:
    """``version`` 1: Gemma language model; 2: Gemma 2. initializer_range=0.1 (HF: 0.02), so that the
    prefix-LM mask moves the logits far above ATOL. ``vision``: overrides of the vision config."""
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-6, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
                initializer_range=0.1, model_type="gemma" if version == 1 else "gemma2")
    if version == 2:
        text.update(layer_types=["sliding_attention", "full_attention"], sliding_window=6, query_pre_attn_scalar=24,
                    attn_logit_softcapping=1.0, final_logit_softcapping=2.0)
    text.update(text_overrides)
    vision = {**dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
                     patch_size=PATCH, vision_use_head=False, layer_norm_eps=1e-6, model_type="siglip_vision_model"),
              **(vision or {})}
    return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID,
                           projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=VOCAB_SIZE)


def make_hf(config: PaliGemmaConfig | None = None, seed: int = 0) -> PaliGemmaForConditionalGeneration:
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config or tiny_paligemma_config())
    return randomise_constants(model)


def make_processor(tile: int = TILE, tokens: int = TOKENS) -> PaliGemmaFlatProcessor:
    image_processor = SiglipImageProcessorPil(size={"height": tile, "width": tile}, image_seq_length=tokens)
    return PaliGemmaFlatProcessor(image_processor, make_tokenizer())


def save_paligemma(tmp_path: Path, config: PaliGemmaConfig | None = None, seed: int = 0):
    """Save a seeded HF model and its processor as on the hub; returns (path, hf_model)."""
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    vision = model.config.vision_config
    make_processor(vision.image_size, (vision.image_size // vision.patch_size) ** 2).save_pretrained(tmp_path)
    # as on the hub: the stock processor class, the image processor in its own preprocessor_config.json
    cfg_file = tmp_path / "processor_config.json"
    settings = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    image_settings = settings.pop("image_processor", None)
    cfg_file.write_text(json.dumps({**settings, "processor_class": "PaliGemmaProcessor"}))
    if image_settings is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(
            {**image_settings, "processor_class": "PaliGemmaProcessor"}))
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs) -> dict:
    """HF forward/generate arguments for a ``VLMInputs``: token_type_ids (0 prefix, 1 suffix) switch on HF's
    prefix-LM mask."""
    return dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                token_type_ids=inputs.extras["token_type_ids"])


def case_strategy() -> Any:
    """Hypothesis strategy over tiny PaliGemma and PaliGemma 2 configurations and inputs (``vlm_lens.testing.Case``).

    Varies the language model (Gemma or Gemma 2), its width, depth, grouped-query ratio and head width; for
    Gemma 2 each layer's type (local or global), the sliding window (1-10 tokens, shorter or longer than the
    image), the attention scale and the attention and logit soft-caps (each on or off); the tower's depth,
    width, heads and patch size (4 or 16 image tokens); inputs: 1-2 prompts in PaliGemma's format (the images,
    then the text) of 1-2 images of any aspect ratio, left or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        version = draw(st.sampled_from([1, 2]))
        text = draw_text(draw)
        text.update(intermediate_size=2 * text["hidden_size"], head_dim=draw(st.sampled_from([8, 16])))
        if version == 2:
            n = text["num_hidden_layers"]
            text.update(layer_types=draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                                  min_size=n, max_size=n)),
                        sliding_window=draw(st.integers(1, 10)), query_pre_attn_scalar=draw(st.sampled_from([8, 24])),
                        attn_logit_softcapping=draw(st.sampled_from([None, 1.0])),
                        final_logit_softcapping=draw(st.sampled_from([None, 2.0])))
        hidden = draw(st.sampled_from([16, 24]))
        vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=draw(st.integers(1, 2)),
                      num_attention_heads=draw(st.sampled_from([1, 2])), patch_size=draw(st.sampled_from([4, 8])))
        inputs = draw_inputs(draw, "<image>")  # PaliGemma's prompts: the images, then the text
        inputs["prompts"] = tuple(p.removeprefix("USER : ").removesuffix(" ASSISTANT :") for p in inputs["prompts"])
        config = tiny_paligemma_config(version, vision, **text)
        return Case(family="paligemma", choices=dict(version=version, text=text, vision=vision), **inputs,
                    save=partial(save_paligemma, config=config), hf_inputs=hf_inputs)

    return cases()
