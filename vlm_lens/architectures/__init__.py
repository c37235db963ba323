"""Model families, one package each, plus what they share.

- ``registry``: ``register`` / ``get_spec`` by HF architecture name; families are discovered by listing
  this folder.
- ``language``: HF text configs -> ``HookedTransformerConfig``; weights through TransformerLens's own
  converters.
- ``checks``: strict weight-name checks.
- ``llava/``, ``llava_next/``, ``llava_onevision/``, ``qwen2_5_vl/``: the families. Each holds its config
  reading, converter, image pipeline, processor shims and test factories (``testing.py``).
"""

from vlm_lens.architectures.registry import (
    ArchitectureSpec,
    all_specs,
    architecture_of,
    get_spec,
    register,
    supported_architectures,
)

__all__ = ["ArchitectureSpec", "all_specs", "architecture_of", "get_spec", "register", "supported_architectures"]
