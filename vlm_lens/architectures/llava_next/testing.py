"""Tiny seeded LLaVA-NeXT and LLaVA-OneVision models and processors for tests (no downloads).

16-px tiles of 4-px patches (a 4x4 grid per tile) and pinpoints up to 32x32, so an image takes at most
five tiles and a few dozen tokens.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from vlm_lens.architectures.llava_onevision.processor import LlavaOnevisionImageProcessor
from vlm_lens.testing import (
    IMAGE_TOKEN_ID,
    TEXT_CONFIGS,
    VOCAB_SIZE,
    Case,
    assert_language_model_matches_hf,
    draw_feature_layer,
    draw_inputs,
    draw_text,
    make_tokenizer,
    randomise_constants,
    seeded_image,
)

PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
TILE, PATCH = 16, 4
# (height, width) of test images and the pinpoint each selects: every pinpoint, with and without unpadding.
SIZES = {"square": (20, 20), "wide": (12, 40), "tall": (40, 12), "small": (12, 12)}
PROMPT = "USER : <image>\nwhat is this ? ASSISTANT :"
PROMPTS = [PROMPT, "USER : <image>\ndescribe ASSISTANT :"]
ATOL = 1e-4


def tiny_vision_config(tower: str = "clip", **overrides):
    common = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  image_size=TILE, patch_size=PATCH)
    if tower == "clip":
        return CLIPVisionConfig(**{**common, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                                   "projection_dim": 16, **overrides})
    return SiglipVisionConfig(**{**common, "layer_norm_eps": 1e-6, "vision_use_head": False, **overrides})


def tiny_text_config(lm: str):
    return TEXT_CONFIGS[lm](
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def _common(tower: str, lm: str, vision: dict | None) -> dict:
    return dict(
        vision_config=tiny_vision_config(tower, **(vision or {})), text_config=tiny_text_config(lm),
        image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        multimodal_projector_bias=True,
    )


def tiny_next_config(tower: str = "clip", lm: str = "llama", vision: dict | None = None, **overrides):
    return LlavaNextConfig(**{**_common(tower, lm, vision), "vision_feature_layer": -2, **overrides})


def tiny_onevision_config(tower: str = "siglip", lm: str = "qwen2", vision: dict | None = None, **overrides):
    return LlavaOnevisionConfig(**{**_common(tower, lm, vision), "vision_feature_layer": -1,
                                   "vision_aspect_ratio": "anyres_max_2", **overrides})


def make_hf(config, seed: int = 0):
    cls = LlavaNextForConditionalGeneration if isinstance(config, LlavaNextConfig) else LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    return randomise_constants(cls(config))


def make_processor(config, resample: int | None = None):
    """The checkpoint's processor with the PIL image processor (``resample``: a PIL filter id)."""
    extra = {} if resample is None else {"resample": resample}
    tile, patch, pinpoints = config.vision_config.image_size, config.vision_config.patch_size, config.image_grid_pinpoints
    strategy = config.vision_feature_select_strategy
    has_cls = config.vision_config.model_type == "clip_vision_model"  # the processors count it, then drop it
    if isinstance(config, LlavaNextConfig):
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=pinpoints, **extra)
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=patch,
                                  vision_feature_select_strategy=strategy, num_additional_image_tokens=int(has_cls))
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                      image_grid_pinpoints=pinpoints, **extra)
    return LlavaOnevisionImageProcessor(image_processor, make_tokenizer(), num_image_tokens=(tile // patch) ** 2 + has_cls,
                                        vision_feature_select_strategy=strategy,
                                        vision_aspect_ratio=config.vision_aspect_ratio)


def save_model(tmp_path: Path, config, seed: int = 0, resample: int | None = None):
    """Save a seeded HF model and its processor as a hub checkpoint would look; returns (path, hf_model)."""
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    make_processor(config, resample).save_pretrained(tmp_path)
    if isinstance(config, LlavaOnevisionConfig):  # as on the hub: the stock processor class and a video config
        cfg_file = tmp_path / "processor_config.json"
        saved = json.loads(cfg_file.read_text())
        cfg_file.write_text(json.dumps({**saved, "processor_class": "LlavaOnevisionProcessor"}))
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
            {"video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor"}))
    return tmp_path, model


def load_pair(tmp_path: Path, config, **kwargs):
    """(HookedVLM with raw weights, the HF model) from one checkpoint saved by ``save_model``."""
    from vlm_lens import HookedVLM

    path, hf = save_model(tmp_path, config, **kwargs)
    return HookedVLM.from_pretrained_no_processing(str(path)), hf


image = seeded_image


def hf_inputs(inputs, padded: bool = False) -> dict:
    """The HF forward arguments for a ``VLMInputs`` (left padding needs explicit positions in HF)."""
    kwargs = dict(input_ids=inputs.tokens, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
                  **inputs.extras)
    if padded:
        kwargs["position_ids"] = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


def hf_stages(hf, inputs, padded=False):
    """HF logits and hidden states, the selected vision features of every tile, and the packed features."""
    cfg, sizes = hf.config, inputs.extras["image_sizes"]
    with torch.no_grad():
        out = hf(**hf_inputs(inputs, padded), output_hidden_states=True)
        tile = cfg.vision_config.image_size
        canvases = [select_best_resolution(s.tolist(), cfg.image_grid_pinpoints) for s in sizes]
        n_tiles = [1 + (h // tile) * (w // tile) for h, w in canvases]
        tiles = torch.cat([pv[:n] for pv, n in zip(inputs.pixel_values, n_tiles)])
        hidden = hf.model.vision_tower(tiles, output_hidden_states=True).hidden_states
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
        feats = torch.cat([hidden[i] for i in layers], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        extra = {k: v for k, v in inputs.extras.items() if k != "image_sizes"}
        packed = torch.cat(hf.model.get_image_features(inputs.pixel_values, sizes, **extra).pooler_output)
    return out, feats, packed


def assert_stages_match(model, hf, inputs, padded=False):
    out, feats, packed = hf_stages(hf, inputs, padded)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    assert (cache["hook_image_features"] - feats).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - packed).abs().max() <= ATOL
    assert_language_model_matches_hf(model, cache, logits, out.hidden_states, out.logits, real, ATOL)


def changed_tokens(model, img, box):
    edited = np.array(img)
    top, left, bottom, right = box
    edited[top:bottom, left:right] = 255 - edited[top:bottom, left:right]
    clean, moved = model.prepare(PROMPT, images=[img]), model.prepare(PROMPT, images=[Image.fromarray(edited)])
    with torch.no_grad():
        _, a = model.run_with_cache(clean, names_filter="hook_image_embeds")
        _, b = model.run_with_cache(moved, names_filter="hook_image_embeds")
    diff = (a["hook_image_embeds"] - b["hook_image_embeds"]).abs().amax(-1)
    return clean.layout, set((diff > 1e-6).nonzero().flatten().add(clean.layout.spans[0].start).tolist())


# ----------------------------------------------------------------------------------- property test
CANDIDATE_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]


def case_strategy() -> Any:
    """Hypothesis strategy over tiny LLaVA-NeXT configurations and inputs (``vlm_lens.testing.Case``): see
    ``draw_anyres_case``; 1-2 images per prompt, each tiled."""
    from hypothesis import strategies as st

    return st.composite(draw_anyres_case)()


def draw_anyres_case(draw: Any, onevision: bool = False) -> Case:
    """One any-resolution case (LLaVA-NeXT, or LLaVA-OneVision with ``onevision``).

    Varies the LM (Llama, Mistral, Qwen2), its width, depth and grouped-query ratio, the tower (CLIP with
    'default' or SigLIP with 'full': tiling needs exactly the patch features), its depth and patch size
    (4x4 or 2x2 patches a tile), the feature layer(s), the projector bias, the pinpoints (OneVision: also
    ``anyres_max_N``); inputs: 1-2 prompts of 1-2 images, each of any size and aspect ratio in 8-48 px, left
    or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    lm, tower = draw(st.sampled_from(sorted(TEXT_CONFIGS))), draw(st.sampled_from(["clip", "siglip"]))
    text = draw_text(draw)
    vision = dict(num_hidden_layers=draw(st.integers(1, 3)), patch_size=draw(st.sampled_from([4, 8])))
    pinpoints = draw(st.lists(st.sampled_from(CANDIDATE_PINPOINTS), min_size=1, max_size=4, unique_by=tuple))
    choices = dict(lm=lm, **text, tower=tower, vision=vision,
                   vision_feature_layer=draw_feature_layer(draw, vision["num_hidden_layers"]),
                   multimodal_projector_bias=draw(st.booleans()), image_grid_pinpoints=pinpoints)
    if onevision:
        choices["vision_aspect_ratio"] = f"anyres_max_{draw(st.sampled_from([1, 2, 4]))}"
    text_config = TEXT_CONFIGS[lm](
        vocab_size=VOCAB_SIZE, **text, intermediate_size=2 * text["hidden_size"], max_position_embeddings=512,
        rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        initializer_range=0.1)
    overrides = {k: v for k, v in choices.items() if k not in ("lm", "tower", "vision", *text)}
    make = tiny_onevision_config if onevision else tiny_next_config
    config = make(tower, lm, vision, text_config=text_config, **overrides)
    return Case(family="llava_onevision" if onevision else "llava_next", choices=choices,
                **draw_inputs(draw, "<image>"), save=partial(save_model, config=config),
                hf_inputs=partial(hf_inputs, padded=True))
