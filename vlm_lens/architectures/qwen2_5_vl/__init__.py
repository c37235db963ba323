"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): windowed 2-D-rotary vision tower, 2x2 patch merger
and a Qwen2 language model with multimodal rotary positions. Images only (no video).

- ``config``: ``QwenVisionConfig``, ``Qwen2_5_VLConfig`` and reading them
- ``convert``: weights (LM through TransformerLens's Qwen2 converter; tower and merger here)
- ``vision``, ``merger``: the hooked tower and the patch merger (the projector)
- ``mrope``: 3-D rotary positions of the language model
- ``pipeline``: ``Qwen2_5_VLPipeline``
- ``processor``: the images-only processor shim (no torchvision)
- ``testing``: tiny seeded checkpoints and a hypothesis strategy
"""

from vlm_lens.architectures.qwen2_5_vl.config import qwen2_5_vl_configs
from vlm_lens.architectures.qwen2_5_vl.convert import convert_qwen2_5_vl
from vlm_lens.architectures.qwen2_5_vl.pipeline import Qwen2_5_VLPipeline
from vlm_lens.architectures.qwen2_5_vl.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register

SPEC = register(ArchitectureSpec(
    name="Qwen2_5_VLForConditionalGeneration",
    build_configs=qwen2_5_vl_configs,
    convert_weights=convert_qwen2_5_vl,
    pipeline=Qwen2_5_VLPipeline,
    load_processor=load_processor,
), family=__name__)
