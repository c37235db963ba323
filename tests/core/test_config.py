"""Config validation: a bad value is a ValueError that names it, for the shared configs and each family's."""

import pytest

from vlm_lens.architectures.llava.config import LlavaConfig
from vlm_lens.architectures.llava_next.config import AnyResConfig
from vlm_lens.architectures.qwen2_5_vl.config import Qwen2_5_VLConfig, QwenVisionConfig
from vlm_lens.config import VisionConfig, VLMConfig, normalise_feature_layers


def vision(**overrides):
    kw = dict(family="clip", d_model=24, n_heads=4, d_mlp=48, n_layers=3, image_size=16, patch_size=4, eps=1e-5,
              act_fn="quick_gelu")
    return VisionConfig(**{**kw, **overrides})


def qwen_vision(**overrides):
    kw = dict(family="qwen2_5_vl", d_model=16, n_heads=2, d_mlp=32, n_layers=3, image_size=None, patch_size=4,
              eps=1e-6, act_fn="silu", has_class_token=False, window_size=16, full_attention_layers=(1,))
    return QwenVisionConfig(**{**kw, **overrides})


def llava(**overrides):
    kw = dict(architecture="LlavaForConditionalGeneration", vision=vision(), image_token_id=3, feature_layers=(2,),
              select_strategy="default", projector_act="gelu", projector_bias=True)
    return LlavaConfig(**{**kw, **overrides})


@pytest.mark.parametrize("overrides, words", [
    (dict(d_model=25), "not divisible by n_heads"),
    (dict(image_size=2), "smaller than patch_size"),
    (dict(patch_size=0), "patch_size=0 must be positive"),
    (dict(n_layers=-1), "n_layers=-1"),
])
def test_vision_config(overrides, words):
    with pytest.raises(ValueError, match=words):
        vision(**overrides)


def test_grid_of_a_dynamic_resolution_tower_points_to_the_layout():
    with pytest.raises(ValueError, match="layout.grid"):
        _ = qwen_vision().grid_size


@pytest.mark.parametrize("overrides, words", [
    (dict(feature_layers=()), "feature_layers is empty"),
    (dict(feature_layers=(4,)), "out of range .* 0..3"),
    (dict(image_token_id=-1), "image_token_id=-1"),
])
def test_vlm_config(overrides, words):
    kw = dict(architecture="X", vision=vision(), image_token_id=3, feature_layers=(2,))
    with pytest.raises(ValueError, match=words):
        VLMConfig(**{**kw, **overrides})


def test_feature_layer_indices():
    assert normalise_feature_layers(-2, 3) == (2,) and normalise_feature_layers([0, -1], 3) == (0, 3)
    with pytest.raises(ValueError, match="vision_feature_layer -5 is out of range"):
        normalise_feature_layers(-5, 3)


@pytest.mark.parametrize("overrides, words", [
    (dict(select_strategy="cls"), "vision_feature_select_strategy='cls'"),
    (dict(vision=vision(family="siglip", has_class_token=False)), "has none .*'full'"),
])
def test_llava_config(overrides, words):
    with pytest.raises(ValueError, match=words):
        llava(**overrides)


def test_llava_token_counts():
    assert llava().n_image_tokens == 16 and llava(select_strategy="full").n_image_tokens == 17


@pytest.mark.parametrize("overrides, words", [
    (dict(image_grid_pinpoints=()), "image_grid_pinpoints is empty"),
    (dict(image_grid_pinpoints=((16, 20),)), r"\[16, 20\] is not a \(height, width\) pair of multiples"),
    (dict(select_strategy="full"), "class token is kept"),
    (dict(vision_aspect_ratio="anyres_9"), "anyres_max_<N>"),
])
def test_any_resolution_config(overrides, words):
    kw = {**vars(llava()), "image_grid_pinpoints": ((16, 32),)}
    with pytest.raises(ValueError, match=words):
        AnyResConfig(**{**kw, **overrides})


def test_any_resolution_max_tiles():
    cfg = AnyResConfig(**{**vars(llava()), "image_grid_pinpoints": ((16, 32),), "vision_aspect_ratio": "anyres_max_4"})
    assert cfg.max_crop_tiles == 4


@pytest.mark.parametrize("overrides, words", [
    (dict(image_size=16), "image_size must be None"),
    (dict(window_size=4), "smaller than one merged token"),
    (dict(full_attention_layers=(3,)), r"full_attention_layers \[3\] are out of range"),
    (dict(d_model=12, n_heads=2), "multiple of 4"),
])
def test_qwen_vision_config(overrides, words):
    with pytest.raises(ValueError, match=words):
        qwen_vision(**overrides)


@pytest.mark.parametrize("overrides, words", [
    (dict(mrope_section=(2, 3)), "3 non-negative numbers"),
    (dict(vision=vision()), "needs a QwenVisionConfig"),
])
def test_qwen_config(overrides, words):
    kw = dict(architecture="Qwen2_5_VLForConditionalGeneration", vision=qwen_vision(), image_token_id=3,
              feature_layers=(3,), mrope_section=(2, 3, 3))
    with pytest.raises(ValueError, match=words):
        Qwen2_5_VLConfig(**{**kw, **overrides})
