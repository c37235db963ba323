"""SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's architecture under its own classes (a SigLIP-like
tower on image tiles, a pixel-shuffle connector, a Llama/SmolLM language model). Everything but the
registration and the processor shim is the ``idefics3`` family's. Images only (no video).
"""

from functools import partial

from vlm_lens.architectures.idefics3.config import idefics3_configs
from vlm_lens.architectures.idefics3.convert import convert_idefics3
from vlm_lens.architectures.idefics3.pipeline import Idefics3Pipeline
from vlm_lens.architectures.idefics3.processor import load_smolvlm_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name="SmolVLMForConditionalGeneration",
    hf_class=_hf_class,
    build_configs=partial(idefics3_configs, architecture="SmolVLMForConditionalGeneration"),
    convert_weights=convert_idefics3,
    pipeline=Idefics3Pipeline,
    load_processor=load_smolvlm_processor,
), family=__name__)
