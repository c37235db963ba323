"""Tiny seeded Idefics3 and SmolVLM checkpoints and processors for tests (no downloads).

16-px tiles of 4-px patches (4x4 patches) shuffled by 2: a tile is 2x2 = 4 image tokens. The image
processor resizes an image's longest edge to 32 px, so images are cut into 1x2, 2x1 or 2x2 crops of 16 px plus
the global image, depending on their aspect ratio. Saved as on the hub: the stock processor class in
``processor_config.json`` and, for SmolVLM, a video processor config (which needs torchvision).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from vlm_lens.architectures.idefics3.processor import Idefics3ImagesOnlyProcessor, SmolVLMImagesOnlyProcessor
from vlm_lens.testing import WORDS, Case, draw_inputs, draw_text, randomise_constants, seeded_image

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
SPECIAL = ["<pad>", "<s>", "</s>", "<image>", "<unk>", FAKE, GLOBAL, "<end_of_utterance>"]
IMAGE_TOKEN_ID, FAKE_ID, GLOBAL_ID = 3, 5, 6
VOCAB_SIZE = 80  # > len(SPECIAL) + len(ROW_COL) + len(WORDS)
TILE, PATCH, SCALE = 16, 4, 2
TOKENS_PER_TILE = (TILE // PATCH // SCALE) ** 2
PROMPTS = ["USER : <image> what is this ? ASSISTANT :", "USER : <image> describe ASSISTANT :"]
# (height, width) -> crops: wide 1x2, tall 2x1, square 2x2 (each plus the global image); small: 1x1 crop
SIZES = {"wide": (12, 30), "tall": (40, 20), "square": (24, 24)}
ATOL = 1e-4
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER :{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def make_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level, with the processors' marker tokens as special tokens; Idefics3 (Llama 3) prepends a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + ROW_COL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # newlines are tokens (the processor writes them between crop rows)
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split(" ", behavior="removed"),
         pre_tokenizers.Split(":", behavior="isolated"), pre_tokenizers.Split("?", behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[5:] + ROW_COL + ["<image>"])


def tiny_config(smolvlm: bool = False, text: dict | None = None, vision: dict | None = None, **overrides):
    """initializer_range=0.1 (HF: 0.02) so that positions, masks and tiles move the logits well above ATOL.
    ``text``, ``vision``: overrides of the text and vision configs; ``overrides``: of the top-level config."""
    text_overrides, vision_overrides = text or {}, vision or {}
    text = dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1, tie_word_embeddings=smolvlm)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
                  patch_size=PATCH, initializer_range=0.1)
    text, vision = {**text, **text_overrides}, {**vision, **vision_overrides}
    cls = SmolVLMConfig if smolvlm else Idefics3Config
    kwargs = dict(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID, scale_factor=SCALE,
                  tie_word_embeddings=smolvlm)
    return cls(**{**kwargs, **overrides})


def make_hf(config, seed: int = 0):
    cls = SmolVLMForConditionalGeneration if isinstance(config, SmolVLMConfig) else Idefics3ForConditionalGeneration
    torch.manual_seed(seed)
    return randomise_constants(cls(config))


def make_processor(smolvlm: bool = False, resample: int | None = None, tile: int = TILE, longest_edge: int = 2 * TILE,
                   image_seq_len: int = TOKENS_PER_TILE):
    """The checkpoint's processor with the PIL image processor (``resample``: a PIL filter id; HF's: Lanczos).
    Images are resized to ``longest_edge`` px and cut into ``tile``-px crops of ``image_seq_len`` tokens each."""
    kwargs = dict(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile})
    if resample is not None:
        kwargs["resample"] = resample
    if smolvlm:
        return SmolVLMImagesOnlyProcessor(SmolVLMImageProcessorPil(**kwargs), make_tokenizer(bos=False),
                                          image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)
    return Idefics3ImagesOnlyProcessor(Idefics3ImageProcessorPil(**kwargs), make_tokenizer(),
                                       image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)


def save_model(tmp_path: Path, config=None, seed: int = 0, resample: int | None = None, longest_edge: int = 2 * TILE):
    """Save a seeded HF model and its processor as a hub checkpoint looks; returns (path, hf_model). The
    processor's tiles and tokens per tile follow the config's ``vision_config.image_size`` and pixel shuffle."""
    config = config or tiny_config()
    smolvlm = isinstance(config, SmolVLMConfig)
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    tile = config.vision_config.image_size
    seq_len = (tile // config.vision_config.patch_size // config.scale_factor) ** 2
    make_processor(smolvlm, resample, tile, longest_edge, seq_len).save_pretrained(tmp_path)
    name = "SmolVLM" if smolvlm else "Idefics3"
    cfg_file = tmp_path / "processor_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "processor_class": f"{name}Processor"}))
    if smolvlm:
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
            {"video_processor_type": "SmolVLMVideoProcessor", "processor_class": "SmolVLMProcessor"}))
    return tmp_path, model


def load_pair(tmp_path: Path, config=None, **kwargs):
    """(HookedVLM with raw weights, the HF model) from one checkpoint saved by ``save_model``."""
    from vlm_lens import HookedVLM

    path, hf = save_model(tmp_path, config, **kwargs)
    return HookedVLM.from_pretrained_no_processing(str(path)), hf


image = seeded_image


def hf_inputs(inputs, padded: bool = True) -> dict:
    """HF forward arguments for a ``VLMInputs`` (left padding needs explicit positions in HF's forward)."""
    kwargs = dict(input_ids=inputs.tokens, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                  pixel_attention_mask=inputs.extras.get("pixel_attention_mask"))
    if padded:
        kwargs["position_ids"] = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Idefics3 configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Llama LM's width, depth and grouped-query ratio, the tower's depth, width, heads, tile size
    (8 or 16 px) and patch size, the pixel-shuffle factor (1, 2 or 4, up to 16 tokens a tile), the longest
    edge images are resized to (1 or 2 tiles: the global image alone, or up to 2x2 crops with it); inputs:
    1-2 prompts of 1-2 images, each of any size and aspect ratio in 8-48 px, left or right padding, float32
    or bfloat16.
    """
    from hypothesis import assume
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        vision = dict(num_hidden_layers=draw(st.integers(1, 3)), hidden_size=draw(st.sampled_from([16, 32])),
                      num_attention_heads=draw(st.sampled_from([2, 4])), image_size=draw(st.sampled_from([8, 16])),
                      patch_size=draw(st.sampled_from([2, 4])))
        grid = vision["image_size"] // vision["patch_size"]
        scale = draw(st.sampled_from([s for s in (1, 2, 4) if grid % s == 0]))
        assume((grid // scale) ** 2 <= 16)  # image tokens a tile
        longest_edge = draw(st.sampled_from([1, 2])) * vision["image_size"]  # the global image only, or 2x2 crops
        choices = dict(text=text, vision=vision, scale_factor=scale, longest_edge=longest_edge)
        base = tiny_config()
        text_config = {**base.text_config.to_dict(), **text, "intermediate_size": 2 * text["hidden_size"]}
        vision_config = {**base.vision_config.to_dict(), **vision, "intermediate_size": 2 * vision["hidden_size"]}
        config = tiny_config(text_config=text_config, vision_config=vision_config, scale_factor=scale)
        return Case(family="idefics3", choices=choices, **draw_inputs(draw, "<image>"),
                    save=partial(save_model, config=config, longest_edge=longest_edge), hf_inputs=hf_inputs)

    return cases()
