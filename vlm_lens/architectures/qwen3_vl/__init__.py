"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, dense): a full-attention 2-D-rotary vision tower with learned
positions, a 2x2 patch merger, deepstack features added to the first language-model layers, and a Qwen3
language model (q/k norms) with interleaved multimodal rotary positions. Images only (no video).

- ``config``: ``Qwen3VisionConfig``, ``Qwen3VLConfig`` and reading them
- ``convert``: weights (LM through TransformerLens's Qwen3 converter; tower and mergers here)
- ``vision``, ``merger``: the hooked tower and the patch mergers (projector and deepstack)
- ``deepstack``: the language-model blocks that add the deepstack features
- ``mrope``: interleaved M-RoPE (positions are Qwen2.5-VL's)
- ``pipeline``: ``Qwen3VLPipeline`` (a ``Qwen2_5_VLPipeline``)
- ``processor``: the images-only processor shim (no torchvision)
- ``testing``: tiny seeded checkpoints
"""

from vlm_lens.architectures.qwen3_vl.config import ARCHITECTURE, qwen3_vl_configs
from vlm_lens.architectures.qwen3_vl.convert import convert_qwen3_vl
from vlm_lens.architectures.qwen3_vl.pipeline import Qwen3VLPipeline
from vlm_lens.architectures.qwen3_vl.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name=ARCHITECTURE,
    hf_class=_hf_class,
    build_configs=qwen3_vl_configs,
    convert_weights=convert_qwen3_vl,
    pipeline=Qwen3VLPipeline,
    load_processor=load_processor,
), family=__name__)
