"""Tiny seeded Mllama models and processors (no downloads).

8 px tiles of 4 px patches (2x2 patches + a class token per tile, padded to 8 positions in the tower), up to 4
tiles per image; a 2-block local tower whose blocks 0 and 1 also give intermediate features and a 1-block global
tower; a 4-layer language model (grouped-query attention) whose block 2 is a cross-attention block. Gates are
drawn away from HF's zero initialisation and weights are initialised at 0.2 (HF: 0.02, which leaves the tower's
attention nearly uniform), so every path moves the logits far above ``ATOL``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
    get_all_supported_aspect_ratios,
)

from vlm_lens.testing import WORDS, Case, draw_inputs, draw_text, randomise_constants, seeded_image

__all__ = ["ATOL", "IMAGE", "IMAGE_TOKEN_ID", "TILE", "case_strategy", "hf_inputs", "hf_logits_row_by_row", "image",
           "make_hf", "make_processor", "make_tokenizer", "save_mllama", "tiny_mllama_config"]

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


def make_processor(tile: int = TILE, max_tiles: int = 4) -> MllamaProcessor:
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    return MllamaProcessor(image_processor, make_tokenizer())


def save_mllama(tmp_path: Path, config: MllamaConfig | None = None, seed: int = 0):
    """Save a seeded HF model and its processor (for the config's tile size and tiles) as on the hub; returns
    (path, hf_model)."""
    model = make_hf(config, seed)
    model.save_pretrained(tmp_path)
    vision = model.config.vision_config
    make_processor(vision.image_size, vision.max_num_tiles).save_pretrained(tmp_path)
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


def hf_logits_row_by_row(hf, inputs) -> torch.Tensor:
    """HF's logits [batch, pos, vocab] with each row run alone on its real tokens and its own images (a row of
    vlm_lens's batch equals that; HF's batched call lets a row read the others' padding image slots)."""
    out = None
    for row in range(len(inputs.tokens)):
        real = inputs.attention_mask[row].bool()
        n_images = int((inputs.tokens[row] == IMAGE_TOKEN_ID).sum())
        kwargs = dict(input_ids=inputs.tokens[row:row + 1, real], attention_mask=inputs.attention_mask[row:row + 1, real])
        if n_images:
            extras = inputs.extras
            kwargs.update(pixel_values=inputs.pixel_values[row:row + 1, :n_images],
                          aspect_ratio_ids=extras["aspect_ratio_ids"][row:row + 1, :n_images],
                          aspect_ratio_mask=extras["aspect_ratio_mask"][row:row + 1, :n_images],
                          cross_attention_mask=extras["cross_attention_mask"][row:row + 1, real, :n_images])
        logits = hf(**kwargs).logits[0]
        if out is None:
            out = logits.new_zeros(*inputs.tokens.shape, logits.shape[-1])
        out[row, real] = logits
    return out


def last_image_token(inputs) -> tuple[int, int, int]:
    """(row, start, end) of the last ``<|image|>`` token: the one token in the sequence that stands for an image."""
    row, pos = (inputs.tokens == IMAGE_TOKEN_ID).nonzero()[-1].tolist()
    return row, pos, pos + 1


def case_strategy() -> Any:
    """Hypothesis strategy over tiny Mllama configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Llama LM's width, grouped-query ratio and depth (2-4 layers) and which layers are
    cross-attention blocks (any but block 0), the tower's width, heads, local and global depth, which local layers give
    intermediate features, its patch size and tiles an image (2 or 4); inputs: 1-2 prompts of 1-2 images,
    each of any size and aspect ratio in 8-48 px, left or right padding, float32 or bfloat16. HF runs each row
    alone (``hf_logits_row_by_row``); the image that goes missing in the bad-input check is its ``<|image|>``.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        text["num_hidden_layers"] = n_layers = draw(st.integers(2, 4))
        # block 0 stays self-attention (vlm_lens reads the KV-cache length there; the config says so)
        text["cross_attention_layers"] = sorted(draw(st.lists(st.integers(1, n_layers - 1), min_size=1,
                                                              max_size=n_layers - 1, unique=True)))
        text["intermediate_size"] = 2 * text["hidden_size"]
        local = draw(st.integers(1, 3))
        max_tiles = draw(st.sampled_from([2, 4]))
        vision = dict(hidden_size=draw(st.sampled_from([16, 32])), attention_heads=draw(st.sampled_from([2, 4])),
                      num_hidden_layers=local, num_global_layers=draw(st.integers(1, 2)),
                      patch_size=draw(st.sampled_from([2, 4])), max_num_tiles=max_tiles,
                      intermediate_layers_indices=draw(st.lists(st.integers(0, local - 1), min_size=1, max_size=local,
                                                                unique=True)))
        vision.update(intermediate_size=2 * vision["hidden_size"],
                      vision_output_dim=vision["hidden_size"] * (1 + len(vision["intermediate_layers_indices"])),
                      supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(max_tiles)])
        base = tiny_mllama_config(**text)
        config = MllamaConfig(text_config=base.text_config.to_dict(),
                              vision_config={**base.vision_config.to_dict(), **vision},
                              image_token_index=IMAGE_TOKEN_ID)
        return Case(family="mllama", choices=dict(text=text, vision=vision), **draw_inputs(draw, IMAGE),
                    save=partial(save_mllama, config=config), hf_inputs=hf_inputs, hf_logits=hf_logits_row_by_row,
                    last_image_tokens=last_image_token)

    return cases()
