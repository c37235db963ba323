"""The one place where vlm_lens silences TransformerLens 3.x's deprecation of HookedTransformer.

TransformerLens 4 removed ``HookedTransformer``; vlm_lens pins ``transformer-lens<4`` on purpose
(see DESIGN.md), so the warning says nothing a vlm_lens user can act on.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings(
    "ignore",
    message=r"HookedTransformer is deprecated",
    category=DeprecationWarning,
)
