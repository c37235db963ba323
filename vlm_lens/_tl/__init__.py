"""Every use of TransformerLens's private API lives in this package.

vlm_lens builds on TransformerLens 3.x's ``HookedTransformer`` (4.0 removed it; SAE Lens still pins
``<4``). Public TransformerLens API (``HookedTransformer``, ``HookPoint``, components, configs,
``ActivationCache``) is used anywhere; what reaches into its internals (method overrides that depend on
the signature of a private helper, KV-cache fields, ``ProcessWeights`` on sub-configs, converters fed a
stand-in model, writes into ``_parameters``, class swaps) is here, so one package changes when
TransformerLens does:

- ``fast/``: faster subclasses of TransformerLens components (the fast path);
- ``components``: class swaps and the attention overrides families build on (external rotary, additive
  masks);
- ``kv_cache``: the KV-cache fields generation and positions read;
- ``weights``: TransformerLens's converters fed a VLM's language model, and writing a parameter in place;
- ``processing``: TransformerLens's weight processing (fold_ln, centring, value-bias folding) with its
  state-dict names and formulas, written into the weights in place.

``TESTED_RANGE`` is the TransformerLens range these modules were written and tested against. At import the
installed version is compared with it; outside it vlm_lens warns once and every model uses TransformerLens's
own classes (``fast=False``), whose behaviour does not depend on the internals of ``fast/``.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

from vlm_lens._tl import compat  # noqa: F401  (silences TL's HookedTransformer deprecation, once)

TESTED_RANGE = ((3, 9), (4, 0))  # >= 3.9, < 4.0: keep pyproject's transformer-lens pin equal to this
FAST_ENV = "VLM_LENS_FAST"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_version() -> str:
    return importlib.metadata.version("transformer-lens")


def in_tested_range(version: str | None = None) -> bool:
    low, high = TESTED_RANGE
    found = _version_tuple(version or installed_version())
    return low <= found < high


_IN_RANGE = in_tested_range()
if not _IN_RANGE:
    warnings.warn(
        f"vlm_lens was tested with transformer-lens >={'.'.join(map(str, TESTED_RANGE[0]))},"
        f"<{'.'.join(map(str, TESTED_RANGE[1]))} but {installed_version()} is installed: models use "
        "TransformerLens's own components (fast=False). Install a tested version for the fast path.",
        stacklevel=2,
    )


def default_fast() -> bool:
    """The fast path unless TransformerLens is outside the tested range or ``VLM_LENS_FAST=0``."""
    if not _IN_RANGE:
        return False
    return os.environ.get(FAST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def resolve_fast(fast: bool | None) -> bool:
    """``fast=None`` means the default; ``fast=True`` outside the tested range is refused."""
    if fast is None:
        return default_fast()
    if fast and not _IN_RANGE:
        raise ValueError(
            f"fast=True needs transformer-lens in the tested range (>=3.9,<4); {installed_version()} is installed. "
            "Use fast=False (TransformerLens's own components) or install a tested version."
        )
    return bool(fast)
