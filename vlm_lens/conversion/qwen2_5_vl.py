"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): windowed 2-D-rotary vision tower, 2x2 patch merger
and a Qwen2 language model with multimodal rotary positions. Images only (no video).

The language model's weights are Qwen2's and go through TransformerLens's ``convert_qwen2_weights``
(``conversion.language``); the vision tower and merger are converted here. The image path and the 3-D
positions live in ``vlm_lens.pipelines_qwen2_5_vl``, chosen through ``VLMConfig.pipeline``.
"""

from __future__ import annotations

import re
from typing import Any, no_type_check

import einops
import torch
from transformer_lens.config import HookedTransformerConfig
from transformers import Qwen2_5_VLProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array

from vlm_lens.config import VisionConfig, VLMConfig
from vlm_lens.conversion.checks import require_exact_keys
from vlm_lens.conversion.language import convert_language_model, text_config_to_tl
from vlm_lens.conversion.registry import ArchitectureSpec, register

_TOP_LEVEL = ("model.language_model.", "model.visual.", "lm_head.")


class _AsQwen2:
    """The Qwen2.5-VL text config read as a Qwen2 one (same weights, names and shapes)."""

    model_type = "qwen2"

    def __init__(self, text_config: Any):
        self._config = text_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"Qwen2.5-VL vision_config.{name}={value!r}: vlm_lens supports square patches only (an int).")
    return value


def qwen2_5_vl_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, VLMConfig]:
    text, vision = hf_config.text_config, hf_config.vision_config
    cfg = text_config_to_tl(_AsQwen2(text), dtype, device)
    if cfg.d_head != text.hidden_size // text.num_attention_heads:
        raise ValueError(f"head_dim={cfg.d_head}, but Qwen2.5-VL's attention uses hidden_size / heads = "
                         f"{text.hidden_size // text.num_attention_heads}; this checkpoint variant is not supported.")
    section = tuple(int(s) for s in text.rope_parameters.get("mrope_section", ()))
    if sum(section) != cfg.d_head // 2 or len(section) != 3:
        raise ValueError(f"rope_parameters['mrope_section']={list(section)} must be 3 numbers adding up to "
                         f"head_dim / 2 = {cfg.d_head // 2}; fix the checkpoint's text_config.")
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"vision_config.out_hidden_size={vision.out_hidden_size} differs from the language model's "
                         f"hidden_size={text.hidden_size}; the merger's output could not enter the sequence.")
    vcfg = VisionConfig(
        family="qwen2_5_vl", d_model=vision.hidden_size, n_heads=vision.num_heads, d_mlp=vision.intermediate_size,
        n_layers=vision.depth, image_size=None, patch_size=_int(vision.patch_size, "patch_size"),
        eps=1e-6,  # transformers hard-codes it for the vision blocks and the merger
        act_fn=vision.hidden_act, n_channels=vision.in_channels, has_class_token=False,
        temporal_patch_size=_int(vision.temporal_patch_size, "temporal_patch_size"),
        spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
        full_attention_layers=tuple(int(i) for i in vision.fullatt_block_indexes),
        rotary_base=float(vision.rope_parameters["rope_theta"]),
    )
    vlm_cfg = VLMConfig(
        architecture="Qwen2_5_VLForConditionalGeneration", vision=vcfg, feature_layers=(vcfg.n_layers,),
        select_strategy="full", image_token_id=hf_config.image_token_id, projector_act="gelu", projector_bias=True,
        pipeline="qwen2_5_vl", mrope_section=section, vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
    )
    return cfg, vlm_cfg


def convert_qwen_vision(visual: torch.nn.Module, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """``vision.*`` and ``projector.*`` weights from an HF ``Qwen2_5_VisionTransformerPretrainedModel``."""
    sd = dict(visual.named_parameters())
    vcfg = cfg.vision
    require_exact_keys(sd.keys(), _expected_vision_params(vcfg.n_layers), "Qwen2.5-VL vision tower")
    n = vcfg.n_heads
    out = {"vision.W_patch": sd["patch_embed.proj.weight"], "projector.ln_q.w": sd["merger.ln_q.weight"],
           "projector.W_in": sd["merger.mlp.0.weight"].T, "projector.b_in": sd["merger.mlp.0.bias"],
           "projector.W_out": sd["merger.mlp.2.weight"].T, "projector.b_out": sd["merger.mlp.2.bias"]}
    for i in range(vcfg.n_layers):
        src, dst = f"blocks.{i}.", f"vision.blocks.{i}."
        weights, biases = sd[src + "attn.qkv.weight"].chunk(3), sd[src + "attn.qkv.bias"].chunk(3)
        for name, w, b in zip("QKV", weights, biases):
            out[f"{dst}attn.W_{name}"] = einops.rearrange(w, "(n h) m -> n m h", n=n)
            out[f"{dst}attn.b_{name}"] = einops.rearrange(b, "(n h) -> n h", n=n)
        out[dst + "attn.W_O"] = einops.rearrange(sd[src + "attn.proj.weight"], "m (n h) -> n h m", n=n)
        out[dst + "attn.b_O"] = sd[src + "attn.proj.bias"]
        out[dst + "ln1.w"], out[dst + "ln2.w"] = sd[src + "norm1.weight"], sd[src + "norm2.weight"]
        for hf, tl in (("gate_proj", "gate"), ("up_proj", "in"), ("down_proj", "out")):
            out[f"{dst}mlp.W_{tl}"] = sd[f"{src}mlp.{hf}.weight"].T
            out[f"{dst}mlp.b_{tl}"] = sd[f"{src}mlp.{hf}.bias"]
    return out


def _expected_vision_params(n_layers: int) -> set[str]:
    keys = {"patch_embed.proj.weight", "merger.ln_q.weight"}
    keys |= {f"merger.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for i in range(n_layers):
        p = f"blocks.{i}."
        keys |= {p + "norm1.weight", p + "norm2.weight"}
        keys |= {f"{p}attn.{m}.{w}" for m in ("qkv", "proj") for w in ("weight", "bias")}
        keys |= {f"{p}mlp.{m}.{w}" for m in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")}
    return keys


def convert_qwen2_5_vl(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: VLMConfig) -> dict[str, torch.Tensor]:
    unknown = [name for name, _ in hf_model.named_parameters() if not name.startswith(_TOP_LEVEL)]
    if unknown:
        raise ValueError(f"{type(hf_model).__name__} has weights vlm_lens does not convert: {unknown[:12]}. "
                         "This checkpoint variant is not supported; loading stops rather than ignore them.")
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, _AsQwen2(hf_model.config.text_config), cfg)
    state.update(convert_qwen_vision(inner.visual, vlm_cfg))
    return state


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """transformers' ``Qwen2_5_VLProcessor`` for images only, as ``model.prepare`` needs it.

    - No video processor: transformers builds those on torchvision, which vlm_lens never installs (see
      ``LlavaOnevisionImageProcessor``); tokenizer, image processor and token counting are unchanged.
    - A bare ``<|image_pad|>`` (e.g. the one ``model.prepare`` puts before a prompt without placeholder) is
      wrapped in ``<|vision_start|>``/``<|vision_end|>``, as Qwen's chat template writes every image.
    - The output also has ``image_sizes``: each image's original (height, width), for ``layout.boxes``.

    Example:
        >>> processor = Qwen2_5_VLImageProcessor.from_pretrained(folder)  # doctest: +SKIP
    """

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @no_type_check
    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any):
        if videos is not None:
            raise ValueError("vlm_lens feeds Qwen2.5-VL still images only; videos are not supported.")
        if text is not None:
            bare = re.compile(rf"(?<!{re.escape('<|vision_start|>')}){re.escape(self.image_token)}")
            wrapped = f"<|vision_start|>{self.image_token}<|vision_end|>"
            text = [bare.sub(wrapped, t) for t in ([text] if isinstance(text, str) else text)]
        out = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
            out["image_sizes"] = torch.tensor(sizes) if kwargs.get("return_tensors") == "pt" else sizes
        return out


def load_qwen_processor(name_or_path: str, **hf_kwargs: Any) -> Qwen2_5_VLImageProcessor:
    return Qwen2_5_VLImageProcessor.from_pretrained(name_or_path, **hf_kwargs)


def _hf_class():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


QWEN2_5_VL = register(
    ArchitectureSpec(
        name="Qwen2_5_VLForConditionalGeneration",
        hf_class=_hf_class,
        build_configs=qwen2_5_vl_configs,
        convert_weights=convert_qwen2_5_vl,
        load_processor=load_qwen_processor,
    )
)
