"""Offline factories for the organism: word-level tokenizer, LLaVA processor, LLaVA-1.5 config.

Nothing here downloads anything; the training script uses these and saves the results next to the
weights, so loading the organism needs only the saved folder.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlm_lens.organism import data

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
WORDS = (
    "user", "assistant", ":", "?", "what", "colour", "shape", "is", "the", "object", "at", "there", "a",
    *data.ANSWERS, "top", "middle", "bottom", "left", "right", "centre",
)  # fmt: skip
# "USER: q1\n<image> ASSISTANT: a1</s>USER: q2 ASSISTANT:" -- the question comes before the image, so the
# image tokens can attend to it (the format the shipped weights were trained on). Text parts are written
# before image parts whatever their order in the message, so chat=True gives the trained format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %} ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '\\n' }}<image>{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer; ``<s>`` is prepended to every encoded text."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *WORDS))}
    if len(vocab) != len(SPECIAL) + len(WORDS):
        raise ValueError("duplicate words in the organism vocabulary")
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=256,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=data.PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    vision_width: int = 64,
    vision_layers: int = 3,
    text_width: int = 128,
    text_layers: int = 4,
    text_mlp: int = 256,
) -> LlavaConfig:
    """LLaVA-1.5 layout: CLIP tower read at layer -2, 2-layer GELU projector, Llama with GQA."""
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=data.IMAGE_SIZE,
        patch_size=data.PATCH,
        hidden_act="quick_gelu",
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=text_width,
        intermediate_size=text_mlp,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=data.GRID * data.GRID,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )


def encode(processor: LlavaProcessor, items) -> dict[str, torch.Tensor]:
    """HF inputs for a list of items (right-padded), plus ``last`` (index of each prompt's final token)
    and ``answer`` (the answer token ids)."""
    batch = processor(
        text=[it.prompt for it in items], images=[it.image for it in items], return_tensors="pt", padding=True
    )
    batch["last"] = batch["attention_mask"].sum(1) - 1
    answer_ids = processor.tokenizer.convert_tokens_to_ids([it.answer for it in items])
    batch["answer"] = torch.tensor(answer_ids)
    return dict(batch)


def encode_fast(processor: LlavaProcessor, items) -> dict[str, torch.Tensor]:
    """Same tensors as :func:`encode` (pixel values to within float rounding, about 5e-7) without the image
    processor's per-image overhead; used for training, and ``tests/organism`` checks the two agree."""
    n_image_tokens = data.GRID * data.GRID
    texts = [it.prompt.replace("<image>", "<image>" * n_image_tokens) for it in items]
    batch = processor.tokenizer(texts, return_tensors="pt", padding=True)
    out = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": pixel_values(processor, [it.image for it in items]),
    }
    out["last"] = out["attention_mask"].sum(1) - 1
    out["answer"] = torch.tensor(processor.tokenizer.convert_tokens_to_ids([it.answer for it in items]))
    return out


def pixel_values(processor: LlavaProcessor, images) -> torch.Tensor:
    """The image processor's normalisation for images already at the tower's size: float [B, 3, H, W]."""
    ip = processor.image_processor
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images]) * np.float32(ip.rescale_factor)
    mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())


def patch_labels(objects_per_image) -> dict[str, torch.Tensor]:
    """Per-patch ground truth, long [B, GRID*GRID] each: colour and shape index of the object covering
    the patch (0 = background), and the patch's 3 x 3 cell index."""
    n = len(objects_per_image)
    colour = np.zeros((n, data.GRID, data.GRID), dtype=np.int64)
    shape = np.zeros_like(colour)
    for i, objects in enumerate(objects_per_image):
        for obj in objects:
            colour[i][obj.patch_mask] = 1 + list(data.COLOURS).index(obj.colour)
            shape[i][obj.patch_mask] = 1 + data.SHAPES.index(obj.shape)
    rows = np.arange(data.GRID) * data.PATCH // data.CELL
    cell = np.broadcast_to(rows[:, None] * data.CELLS + rows[None, :], colour.shape)
    flat = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(n, -1))  # noqa: E731
    return {"colour": flat(colour), "shape": flat(shape), "cell": flat(cell)}
