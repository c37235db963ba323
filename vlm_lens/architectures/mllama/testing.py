"""Tiny seeded Mllama models and processors (no downloads).

8 px tiles of 4 px patches (2x2 patches + a class token per tile, padded to 8 positions in the tower), up to 4
tiles per image; a 2-block local tower whose blocks 0 and 1 also give intermediate features and a 1-block global
tower; a 4-layer language model (grouped-query attention) whose block 2 is a cross-attention block. Gates are
drawn away from HF's zero initialisation and weights are initialised at 0.2 (HF: 0.02, which leaves the tower's
attention nearly uniform), so every path moves the logits far above ``ATOL``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from vlm_lens.testing import WORDS, randomise_constants, seeded_image

__all__ = ["ATOL", "IMAGE", "IMAGE_TOKEN_ID", "TILE", "hf_inputs", "image", "make_hf", "make_processor",
           "make_tokenizer", "save_mllama", "tiny_mllama_config"]

IMAGE = "<|image|>"
SPECIAL = ["<pad>", "<s>", "</s>", IMAGE, "<unk>"]
IMAGE_TOKEN_ID = 3
VOCAB = 40  # the LM's vocabulary; the embedding has 8 rows more, as in Llama 3.2 Vision
TILE = 8
ATOL = 1e-4


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(IMAGE, behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=[IMAGE])


def tiny_mllama_config(**text_overrides) -> MllamaConfig:
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[2], max_position_embeddings=128, rms_norm_eps=1e-5,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0})
    text.update(text_overrides)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=TILE, patch_size=4, max_num_tiles=4, intermediate_layers_indices=[1, 0],
                  vision_output_dim=48, supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2],
                                                                  [3, 1], [4, 1]])
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID)


def make_hf(config: MllamaConfig | None = None, seed: int = 0) -> MllamaForConditionalGeneration:
    torch.manual_seed(seed)
    model = randomise_constants(MllamaForConditionalGeneration(config or tiny_mllama_config()),
                                names=("norm", "embedding"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 1 and "gate" in name:  # HF starts gates at 0 (or pi/4): make each path count
                p.uniform_(0.4, 1.2)
    return model.eval()


def make_processor() -> MllamaProcessor:
    image_processor = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    return MllamaProcessor(image_processor, make_tokenizer())


def save_mllama(tmp_path: Path, config: MllamaConfig | None = None, seed: int = 0):
    """Save a seeded HF model and its processor as on the hub; returns (path, hf_model)."""
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    make_processor().save_pretrained(tmp_path)
    return tmp_path, model


image = seeded_image


def hf_inputs(inputs, rows: slice | None = None) -> dict:
    """HF forward/generate arguments for a ``VLMInputs`` (optionally some rows only)."""
    rows = rows or slice(None)
    out = dict(input_ids=inputs.tokens[rows], attention_mask=inputs.attention_mask[rows])
    if inputs.pixel_values is not None:
        out.update(pixel_values=inputs.pixel_values[rows],
                   **{k: inputs.extras[k][rows] for k in ("aspect_ratio_ids", "aspect_ratio_mask",
                                                          "cross_attention_mask")})
    return out
