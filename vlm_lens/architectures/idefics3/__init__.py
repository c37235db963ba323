"""Idefics3 (``Idefics3ForConditionalGeneration``): a SigLIP-like tower on image tiles, a pixel-shuffle
connector and a Llama language model. Images only (no video). SmolVLM, the same architecture under its own
classes, is the ``smolvlm`` family, built from these modules.

- ``config``: ``Idefics3Config`` and reading it from either HF config
- ``convert``: weights (LM through TransformerLens's Llama converter; tower and connector here)
- ``vision``: the hooked tower (masked patches, fractional position ids, post-layernorm) and the pixel shuffle
- ``projector``: the connector's linear projection
- ``pipeline``: ``Idefics3Pipeline``
- ``tiles``: the layout, one ``TileSpan`` per tile (crops and global image), with the marker tokens
- ``processor``: images-only processor shims (no torchvision, no num2words; flat image lists; tile grids)
- ``testing``: tiny seeded checkpoints of both
"""

from functools import partial

from vlm_lens.architectures.idefics3.config import idefics3_configs
from vlm_lens.architectures.idefics3.convert import convert_idefics3
from vlm_lens.architectures.idefics3.pipeline import Idefics3Pipeline
from vlm_lens.architectures.idefics3.processor import load_idefics3_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def _hf_class():
    from transformers import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration


SPEC = register(ArchitectureSpec(
    name="Idefics3ForConditionalGeneration",
    hf_class=_hf_class,
    build_configs=partial(idefics3_configs, architecture="Idefics3ForConditionalGeneration"),
    convert_weights=convert_idefics3,
    pipeline=Idefics3Pipeline,
    load_processor=load_idefics3_processor,
), family=__name__)
