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
CHAT_WORDS = ("user", "assistant", ":", "?")
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


def build_tokenizer(source=data) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer over ``source``'s words (``source``: a scene generator, ``data`` or
    ``scenes``); ``<s>`` is prepended to every encoded text."""
    words = (*CHAT_WORDS, *source.WORDS)
    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *words))}
    if len(vocab) != len(SPECIAL) + len(words):
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


def build_processor(source=data) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": source.IMAGE_SIZE},
        crop_size={"height": source.IMAGE_SIZE, "width": source.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(source),
        patch_size=source.PATCH,
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
    source=data,
) -> LlavaConfig:
    """LLaVA-1.5 layout: CLIP tower read at layer -2, 2-layer GELU projector, Llama with GQA."""
    tok = build_tokenizer(source)
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=source.IMAGE_SIZE,
        patch_size=source.PATCH,
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
        image_seq_length=source.GRID * source.GRID,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )


def encode(processor: LlavaProcessor, items, with_answers: bool = False) -> dict[str, torch.Tensor]:
    """HF inputs for a list of items (right-padded), plus ``last`` (index of each prompt's final token),
    ``answer`` (the first answer token's id) and ``answers`` (all answer token ids, long [B, A], -100 past
    each answer's end). With ``with_answers`` each text is the prompt followed by its answer (no ``</s>``),
    so the logits at ``last + k`` predict answer token ``k`` under teacher forcing."""
    tok = processor.tokenizer
    texts = [f"{it.prompt} {it.answer}" if with_answers else it.prompt for it in items]
    batch = dict(processor(text=texts, images=[it.image for it in items], return_tensors="pt", padding=True))
    answers = [tok.convert_tokens_to_ids(it.answer.split()) for it in items]
    batch["last"] = (
        batch["attention_mask"].sum(1) - 1 - (torch.tensor([len(a) for a in answers]) if with_answers else 0)
    )
    batch["answer"] = torch.tensor([a[0] for a in answers])
    batch["answers"] = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(a) for a in answers], batch_first=True, padding_value=-100
    )
    return batch


def encode_fast(processor: LlavaProcessor, items) -> dict[str, torch.Tensor]:
    """The prompt-only tensors of :func:`encode` (``input_ids``, ``attention_mask``, ``pixel_values`` to within
    float rounding, about 5e-7, ``last``, ``answer``; no ``answers``) without the image processor's per-image
    overhead; ``tests/organism`` checks the two agree."""
    n_image_tokens = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
    texts = [it.prompt.replace("<image>", "<image>" * n_image_tokens) for it in items]
    batch = processor.tokenizer(texts, return_tensors="pt", padding=True)
    out = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": pixel_values(processor, [it.image for it in items]),
    }
    out["last"] = out["attention_mask"].sum(1) - 1
    first = [it.answer.split()[0] for it in items]
    out["answer"] = torch.tensor(processor.tokenizer.convert_tokens_to_ids(first))
    return out


def pixel_values(processor: LlavaProcessor, images) -> torch.Tensor:
    """The image processor's normalisation for images already at the tower's size: float [B, 3, H, W]."""
    ip = processor.image_processor
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images]) * np.float32(ip.rescale_factor)
    mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())


def patch_labels(objects_per_image, source=data, targets=None) -> dict[str, torch.Tensor]:
    """Per-patch ground truth, long [B, GRID*GRID] each: colour and shape index of the object with most
    pixels in the patch (0 = background), the 3 x 3 cell holding the patch's centre and, with ``targets``
    (bool [GRID, GRID] per image), whether the patch belongs to the answer's objects."""
    n, grid, patch = len(objects_per_image), source.GRID, source.PATCH
    colour = np.zeros((n, grid, grid), dtype=np.int64)
    shape = np.zeros_like(colour)
    for i, objects in enumerate(objects_per_image):
        best = np.zeros((grid, grid))
        for obj in objects:
            share = obj.pixel_mask.reshape(grid, patch, grid, patch).sum(axis=(1, 3))
            wins = share > best
            colour[i][wins] = 1 + list(source.COLOURS).index(obj.colour)
            shape[i][wins] = 1 + source.SHAPES.index(obj.shape)
            best = np.maximum(best, share)
    rows = (np.arange(grid) * patch + patch // 2) // source.CELL
    cell = np.broadcast_to(rows[:, None] * source.CELLS + rows[None, :], colour.shape)
    flat = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(n, -1))  # noqa: E731
    out = {"colour": flat(colour), "shape": flat(shape), "cell": flat(cell)}
    if targets is not None:
        out["target"] = flat(np.stack(targets).astype(np.int64))
    return out
