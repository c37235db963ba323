"""Llama 3.2 Vision (``MllamaForConditionalGeneration``): a tiled ViT (local and gated global transformers,
aspect-ratio embeddings, intermediate-layer features), a linear projector, and a Llama language model with gated
cross-attention blocks at ``cross_attention_layers``. Images are read through cross-attention only: the
``<|image|>`` token stays a text token and nothing is written over the sequence.

- ``config``: ``MllamaVisionConfig``, ``MllamaConfig`` and reading them
- ``convert``: weights (self-attention layers through TransformerLens's Llama converter; the rest here)
- ``vision``, ``projector``: the hooked tower and projector
- ``cross_attention``: ``CrossAttentionBlock`` and the key layout it reads (``CrossKeys``)
- ``pipeline``: ``MllamaPipeline`` (plan, features, the layout on the key axis)
- ``processor``: transformers' processor taking a batch's images flat (as ``model.prepare`` gives them)
- ``analysis``: knockout, key/value readout and patching on the cross-attention keys
- ``testing``: tiny seeded checkpoints
"""

from vlm_lens.architectures.mllama.config import ARCHITECTURE, mllama_configs
from vlm_lens.architectures.mllama.convert import convert_mllama
from vlm_lens.architectures.mllama.pipeline import MllamaPipeline
from vlm_lens.architectures.mllama.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name=ARCHITECTURE,
    hf_class=_hf_class,
    build_configs=mllama_configs,
    convert_weights=convert_mllama,
    pipeline=MllamaPipeline,
    load_processor=load_processor,
), family=__name__)
