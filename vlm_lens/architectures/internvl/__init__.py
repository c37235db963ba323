"""InternVL 3 (``InternVLForConditionalGeneration``): InternViT on image tiles (crops plus a thumbnail), a
pixel-shuffle MLP projector and a Qwen2 (or Llama) language model. Images only (no video).

- ``config``: ``InternViTConfig``, ``InternVLConfig`` and reading them from HF's config
- ``convert``: weights (LM through TransformerLens's converters; tower and projector here, layer scale folded)
- ``vision``: the hooked tower (CLS token, layer scale, LayerNorm or RMSNorm) and the pixel shuffle
- ``projector``: LayerNorm and the two-layer MLP
- ``pipeline``: ``InternVLPipeline``
- ``tiles``: the layout, one ``TileSpan`` per tile (Idefics3's), with the ``<img>``/``</img>`` markers
- ``processor``: the images-only processor shim (no torchvision; tile grids and image sizes)
- ``testing``: tiny seeded checkpoints
"""

from vlm_lens.architectures.internvl.config import internvl_configs
from vlm_lens.architectures.internvl.convert import convert_internvl
from vlm_lens.architectures.internvl.pipeline import InternVLPipeline
from vlm_lens.architectures.internvl.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register

SPEC = register(ArchitectureSpec(
    name="InternVLForConditionalGeneration",
    build_configs=internvl_configs,
    convert_weights=convert_internvl,
    pipeline=InternVLPipeline,
    load_processor=load_processor,
), family=__name__)
