"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower, a pooling projector and a Gemma 3 language
model whose image tokens attend to each other in both directions. Images only; no pan-and-scan.

- ``config``: ``Gemma3Config`` and the language model's ``HookedTransformerConfig``
- ``convert``: weights (LM through TransformerLens's Gemma converter; tower and projector here)
- ``modules``: the tower's final norm and the pooling projector
- ``mask``: the image-block attention mask of the language model
- ``pipeline``: ``Gemma3Pipeline``
- ``processor``: the processor shim (flat image lists, pan-and-scan refused)
- ``testing``: tiny seeded checkpoints, for the tests
"""

from vlm_lens.architectures.gemma3.config import gemma3_configs
from vlm_lens.architectures.gemma3.convert import convert_gemma3
from vlm_lens.architectures.gemma3.pipeline import Gemma3Pipeline
from vlm_lens.architectures.gemma3.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name="Gemma3ForConditionalGeneration",
    hf_class=_hf_class,
    build_configs=gemma3_configs,
    convert_weights=convert_gemma3,
    pipeline=Gemma3Pipeline,
    load_processor=load_processor,
), family=__name__)
