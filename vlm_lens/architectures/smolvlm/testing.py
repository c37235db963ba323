"""A hypothesis strategy over tiny SmolVLM checkpoints for the property test; the factories (config, processor,
``save_model``, ``hf_inputs``) are Idefics3's, in ``vlm_lens.architectures.idefics3.testing``."""

from __future__ import annotations

from functools import partial
from typing import Any

from vlm_lens.architectures.idefics3.testing import hf_inputs, save_model, tiny_config
from vlm_lens.testing import Case, draw_inputs, draw_text

__all__ = ["case_strategy"]

# (tile px, patch px, pixel-shuffle factor) with at most 16 tokens per tile: with up to 3x3 crops plus the global
# image, two images stay within ~320 image tokens (and the LM's 512 positions), and an example under ~1 s.
SHAPES = [(tile, patch, scale) for tile in (16, 32) for patch in (4, 8) for scale in (1, 2)
          if (tile // patch // scale) ** 2 <= 16]


def case_strategy() -> Any:
    """Hypothesis strategy over tiny SmolVLM configurations and inputs (``vlm_lens.testing.Case``).

    Varies the Llama LM's width, depth, grouped-query ratio and whether its embeddings are tied, the SigLIP-like
    tower's depth (0-2), width and heads, the tile size (16 or 32 px), patch size (4 or 8 px) and pixel-shuffle
    factor (1 or 2), so a tile is 1 to 16 tokens (``SHAPES``), and the processor's resize target (1-3 tiles on the longest
    edge, so 1x1 to 3x3 crops plus the global image); inputs: 1-2 prompts of 1-2 images, each of any size and
    aspect ratio in 8-48 px, left or right padding, float32 or bfloat16.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> Case:
        text = draw_text(draw)
        tied = draw(st.booleans())
        text.update(intermediate_size=2 * text["hidden_size"], tie_word_embeddings=tied)
        width = draw(st.sampled_from([16, 32]))
        tile, patch, scale = draw(st.sampled_from(SHAPES))
        vision = dict(num_hidden_layers=draw(st.integers(0, 2)), hidden_size=width, intermediate_size=2 * width,
                      num_attention_heads=draw(st.sampled_from([1, 2, 4])), image_size=tile, patch_size=patch)
        longest_edge = draw(st.integers(1, 3)) * vision["image_size"]
        config = tiny_config(smolvlm=True, text=text, vision=vision, scale_factor=scale, tie_word_embeddings=tied)
        choices = dict(text=text, vision=vision, scale_factor=scale, longest_edge=longest_edge)
        return Case(family="smolvlm", choices=choices, **draw_inputs(draw, "<image>"),
                    save=partial(save_model, config=config, longest_edge=longest_edge), hf_inputs=hf_inputs)

    return cases()
