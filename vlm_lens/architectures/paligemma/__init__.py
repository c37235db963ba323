"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a SigLIP tower read after its final norm,
a linear projector and a Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) language model with prefix-LM attention:
the images and the text prefix attend to each other in both directions, the suffix causally.

- ``config``: ``PaliGemmaConfig`` and the language model's ``HookedTransformerConfig`` (Gemma or Gemma 2)
- ``convert``: weights (LM through TransformerLens's Gemma converter; tower and projector here)
- ``modules``: the linear projector (the tower is Gemma 3's: SigLIP plus its final norm)
- ``mask``: the prefix-LM attention mask of the language model
- ``pipeline``: ``PaliGemmaPipeline``
- ``processor``: the processor shim (flat image lists, image sizes, no doubled placeholder separator)
- ``testing``: tiny seeded checkpoints, for the tests
"""

from vlm_lens.architectures.paligemma.config import paligemma_configs
from vlm_lens.architectures.paligemma.convert import convert_paligemma
from vlm_lens.architectures.paligemma.pipeline import PaliGemmaPipeline
from vlm_lens.architectures.paligemma.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name="PaliGemmaForConditionalGeneration",
    hf_class=_hf_class,
    build_configs=paligemma_configs,
    convert_weights=convert_paligemma,
    pipeline=PaliGemmaPipeline,
    load_processor=load_processor,
), family=__name__)
