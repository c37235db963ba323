"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a full-attention 2-D-rotary vision tower with LayerNorm and
quick-GELU MLPs, the 2x2 patch merger and a Qwen2 language model with multimodal rotary positions. Images only
(no video). Built on Qwen2.5-VL's family, which differs only in its tower (RMSNorm, SwiGLU, windows).

- ``config``: reading an HF ``Qwen2VLConfig`` (a windowless ``QwenVisionConfig`` + Qwen2.5-VL's LM part)
- ``convert``: the tower's LayerNorm and MLP weights; the rest as Qwen2.5-VL's converter
- ``vision``: ``HookedQwen2VLVision``
- ``pipeline``: ``Qwen2VLPipeline`` (Qwen2.5-VL's with this tower)
- ``processor``: the images-only processor shim (no torchvision)
- ``testing``: tiny seeded checkpoints saved as on the hub
"""

from vlm_lens.architectures.qwen2_vl.config import qwen2_vl_configs
from vlm_lens.architectures.qwen2_vl.convert import convert_qwen2_vl
from vlm_lens.architectures.qwen2_vl.pipeline import Qwen2VLPipeline
from vlm_lens.architectures.qwen2_vl.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name="Qwen2VLForConditionalGeneration",
    hf_class=_hf_class,
    build_configs=qwen2_vl_configs,
    convert_weights=convert_qwen2_vl,
    pipeline=Qwen2VLPipeline,
    load_processor=load_processor,
), family=__name__)
