"""Tiny seeded LLaVA-1.5 checkpoints for tests (no downloads), also with a Pixtral tower (Pixtral-12B's layout,
saved with the Pixtral processor as on the hub), and a hypothesis strategy over configs of both."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionConfig,
)

from vlm_lens.architectures.pixtral import testing as pixtral_testing
from vlm_lens.testing import (
    IMAGE_TOKEN_ID,
    TEXT_CONFIGS,
    VOCAB_SIZE,
    Case,
    draw_feature_layer,
    draw_inputs,
    draw_text,
    make_tokenizer,
    padded_hf_inputs,
    randomise_constants,
)


def make_processor(image_size: int = 16, patch_size: int = 4, strategy: str = "default",
                   has_class_token: bool = True) -> LlavaProcessor:
    """``has_class_token``: the tower's (CLIP: yes, SigLIP: no); the processor counts it among the image tokens."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=int(has_class_token),
    )


def tiny_llava_config(lm: str = "llama", **overrides) -> LlavaConfig:
    """A LLaVA-1.5-shaped config small enough for CPU tests; keyword overrides go to LlavaConfig."""
    text = TEXT_CONFIGS[lm](
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
    )
    kwargs = dict(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", multimodal_projector_bias=True,
    )
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def make_hf_llava(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return randomise_constants(LlavaForConditionalGeneration(config), names=("norm", "ln_q", "ln_pre"))


def save_llava(tmp_path: Path, config: LlavaConfig | None = None, seed: int = 0,
               with_processor: bool = True) -> tuple[Path, LlavaForConditionalGeneration]:
    config = config or tiny_llava_config()
    model = make_hf_llava(config, seed)
    model.save_pretrained(tmp_path)
    if with_processor:
        vision, strategy = config.vision_config, config.vision_feature_select_strategy
        has_cls = vision.model_type == "clip_vision_model"
        make_processor(vision.image_size, vision.patch_size, strategy, has_cls).save_pretrained(tmp_path)
    return tmp_path, model


def tiny_llava_pixtral_config(**overrides) -> LlavaConfig:
    """LLaVA with a Pixtral tower, shaped like Pixtral-12B (the last layer's features, strategy "full", Mistral LM)
    on the tiny Mistral 3's tower and LM, with 8-px patches and images up to 32 px a side: no merger, so its token
    grids equal the tiny Mistral 3's (``pixtral.testing.SIZES``: 3x4, 4x3 and 2x2)."""
    base = pixtral_testing.tiny_mistral3_config()
    vision = {**base.vision_config.to_dict(), "patch_size": 8}
    kwargs = dict(text_config=base.text_config.to_dict(), vision_config=vision,
                  image_token_id=pixtral_testing.IMAGE_TOKEN_ID, vision_feature_layer=-1,
                  vision_feature_select_strategy="full", projector_hidden_act="gelu", multimodal_projector_bias=True,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def save_llava_pixtral(tmp_path: Path, config: LlavaConfig | None = None,
                       seed: int = 0) -> tuple[Path, LlavaForConditionalGeneration]:
    """A seeded LLaVA on a Pixtral tower, saved with ``PixtralProcessor`` settings as on the hub."""
    return pixtral_testing.save_with_processor(tmp_path, make_hf_llava(config or tiny_llava_pixtral_config(), seed))


def case_strategy() -> Any:
    """Hypothesis strategy over tiny LLaVA-1.5 configurations and inputs (``vlm_lens.testing.Case``).

    Varies the LM (Llama, Mistral, Qwen2), its width, depth and grouped-query ratio, the tower (CLIP or
    SigLIP here; Pixtral in ``pixtral_case_strategy``, drawn as often), its depth and patch size, the feature
    layer(s) and select strategy and the projector bias; inputs: 1-2 prompts of 1-2 images of any aspect ratio,
    left or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        lm, tower = draw(st.sampled_from(sorted(TEXT_CONFIGS))), draw(st.sampled_from(["clip", "siglip"]))
        text = draw_text(draw)
        vision = dict(hidden_size=24, intermediate_size=48, num_attention_heads=4, image_size=16,
                      num_hidden_layers=draw(st.integers(1, 3)), patch_size=draw(st.sampled_from([4, 8])))
        choices = dict(
            lm=lm, **text, tower=tower, vision_layers=vision["num_hidden_layers"], patch=vision["patch_size"],
            vision_feature_layer=draw_feature_layer(draw, vision["num_hidden_layers"]),
            # SigLIP has no class token to drop: 'default' is CLIP's only
            vision_feature_select_strategy=draw(st.sampled_from(["default", "full"])) if tower == "clip" else "full",
            multimodal_projector_bias=draw(st.booleans()))
        vision_config = (CLIPVisionConfig(**vision, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)
                         if tower == "clip" else SiglipVisionConfig(**vision, layer_norm_eps=1e-6, vision_use_head=False))
        text_config = TEXT_CONFIGS[lm](
            vocab_size=VOCAB_SIZE, **text, intermediate_size=2 * text["hidden_size"], max_position_embeddings=256,
            rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            initializer_range=0.1)
        config = tiny_llava_config(lm, vision_config=vision_config, text_config=text_config, **{k: choices[k] for k in (
            "vision_feature_layer", "vision_feature_select_strategy", "multimodal_projector_bias")})
        return Case(family="llava", choices=choices, **draw_inputs(draw, "<image>"),
                    save=partial(save_llava, config=config), hf_inputs=padded_hf_inputs)

    return st.one_of(cases(), pixtral_case_strategy())


def pixtral_case_strategy() -> Any:
    """Tiny LLaVA configurations on a Pixtral tower: the LM as above, the tower's depth, width, heads, patch size
    (4 or 8 px) and longest edge (16 or 32 px), the feature layer(s) (strategy "full": no class token) and the
    projector bias; inputs: 1-2 prompts of 1-2 ``[IMG]`` each, of any size and aspect ratio in 8-48 px."""
    from hypothesis import assume
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        lm, text = draw(st.sampled_from(sorted(TEXT_CONFIGS))), draw_text(draw)
        vision = dict(num_hidden_layers=draw(st.integers(1, 3)), hidden_size=draw(st.sampled_from([16, 32])),
                      num_attention_heads=draw(st.sampled_from([2, 4])), patch_size=draw(st.sampled_from([4, 8])),
                      image_size=draw(st.sampled_from([16, 32])))
        assume(vision["image_size"] // vision["patch_size"] <= 8)  # up to 8x8 tokens an image
        choices = dict(lm=lm, **text, tower="pixtral", vision=vision,
                       vision_feature_layer=draw_feature_layer(draw, vision["num_hidden_layers"]),
                       multimodal_projector_bias=draw(st.booleans()))
        base = tiny_llava_pixtral_config()
        vision_config = {**base.vision_config.to_dict(), **vision, "intermediate_size": 2 * vision["hidden_size"],
                         "head_dim": vision["hidden_size"] // vision["num_attention_heads"]}
        text_config = TEXT_CONFIGS[lm](
            vocab_size=VOCAB_SIZE, **text, intermediate_size=2 * text["hidden_size"], max_position_embeddings=256,
            rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            initializer_range=0.1)
        config = tiny_llava_pixtral_config(text_config=text_config, vision_config=vision_config, **{
            k: choices[k] for k in ("vision_feature_layer", "multimodal_projector_bias")})
        return Case(family="llava", choices=choices, **draw_inputs(draw, "[IMG]"),
                    save=partial(save_llava_pixtral, config=config), hf_inputs=pixtral_testing.hf_inputs)

    return cases()
