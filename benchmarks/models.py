"""Benchmark model shapes: LLaVA-1.5-shaped configs with random weights, saved to a local folder.

Nothing is downloaded: configs are built from transformers classes, weights are HF's own random
initialisation (seeded), and the folder holds config, safetensors and a small word-level processor, so
``HookedVLM.from_pretrained(folder)`` and ``LlavaForConditionalGeneration.from_pretrained(folder)``
read exactly the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_lens.architectures.llava.testing import make_processor
from vlm_lens.testing import IMAGE_TOKEN_ID  # "<image>" in the test tokenizer


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration (LLaVA-1.5: CLIP tower, feature layer -2, 2-layer GELU projector)."""

    name: str
    image_size: int
    patch_size: int
    v_layers: int
    v_width: int
    v_heads: int
    v_mlp: int
    lm_layers: int
    lm_width: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab: int
    dtype: torch.dtype
    device: str
    batches: tuple[int, ...]
    text_tokens: int = 24  # text tokens around the image (bos + prompt + question)
    # the inputs' seed: one whose greedy continuation is not one repeated token (so that comparing
    # generated tokens with HF's checks the KV cache, not one fixed point of the random weights)
    input_seed: int = 0

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.n_image_tokens + self.text_tokens


# One row per configuration, kept as a table.
# fmt: off
SHAPES = {
    # The CPU model: CLIP ViT-B/16 at 224 px, an 8-layer 1024-wide Llama, fp32.
    "cpu": Shape("cpu", 224, 16, 12, 768, 12, 3072, 8, 1024, 16, 16, 2816, 32064,
                 torch.float32, "cpu", (1, 8)),
    # --quick: the same structure, about 15x less compute.
    "quick": Shape("quick", 112, 16, 4, 384, 6, 1536, 4, 512, 8, 8, 1408, 32064,
                   torch.float32, "cpu", (1, 2), input_seed=4),
    # The smoke test: seconds, not minutes.
    "tiny": Shape("tiny", 32, 8, 2, 64, 4, 128, 2, 64, 4, 2, 128, 512, torch.float32, "cpu", (1, 2), 8),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B (Vicuna), bf16 on a GPU.
    "llava-7b": Shape("llava-7b", 336, 14, 24, 1024, 16, 4096, 32, 4096, 32, 32, 11008, 32064,
                      torch.bfloat16, "cuda", (1, 8)),
}
# fmt: on


def llava_config(shape: Shape):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.lm_width,
        intermediate_size=shape.lm_mlp,
        num_hidden_layers=shape.lm_layers,
        num_attention_heads=shape.lm_heads,
        num_key_value_heads=shape.lm_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.v_width,
        intermediate_size=shape.v_mlp,
        num_hidden_layers=shape.v_layers,
        num_attention_heads=shape.v_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=shape.v_width,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    )


def build_folder(shape: Shape, folder: Path, seed: int = 0) -> int:
    """Save a seeded random-weight LLaVA of ``shape`` (weights in ``shape.dtype``) to ``folder``.

    Returns the bytes of the weights (the safetensors payload)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    device = shape.device if shape.device != "cuda" or torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(shape.dtype)  # built in the target dtype: a 7B model in float32 first would need 28 GB
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_config(shape)).eval()
    finally:
        torch.set_default_dtype(default)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder)
    processor = make_processor(shape.image_size, shape.patch_size)
    processor.save_pretrained(folder)
    del model
    return n_bytes


def make_inputs(shape: Shape, batch: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, seq] tokens (bos, words, the image's tokens, words) and [batch, 3, H, W] pixels
    (``seed`` defaults to the shape's ``input_seed``)."""
    g = torch.Generator().manual_seed(shape.input_seed if seed is None else seed)
    before = shape.text_tokens // 2
    rows = []
    for _ in range(batch):
        words = torch.randint(5, min(shape.vocab, 20000), (shape.text_tokens - 1,), generator=g)
        image = torch.full((shape.n_image_tokens,), IMAGE_TOKEN_ID)
        rows.append(torch.cat([torch.tensor([1]), words[:before], image, words[before:]]))
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=g)
    return torch.stack(rows), pixels.to(shape.dtype)
