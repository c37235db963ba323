"""Model families, one package each, plus what they share.

- ``registry``: ``register`` / ``get_spec`` by HF architecture name; families are discovered by listing
  this folder.
- ``language``: HF text configs -> ``HookedTransformerConfig``; weights through TransformerLens's own
  converters.
- ``checks``: strict weight-name checks.
- one folder per family (``llava/``, ``qwen2_5_vl/``, ...; ``supported_architectures()`` lists them all):
  its config reading, converter, image pipeline, processor shims and test factories (``testing.py``).
  ``README.md`` here lists the files a new family needs.
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
