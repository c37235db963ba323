"""Strict key and shape checks shared by the converters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _preview(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def require_exact_keys(actual: Iterable[str], expected: Iterable[str], what: str, hint: str = "") -> None:
    """Raise a ValueError listing missing and unexpected keys, unless the two sets are equal."""
    actual, expected = set(actual), set(expected)
    missing, extra = expected - actual, actual - expected
    if not missing and not extra:
        return
    parts = [f"{what}: weight names do not match what vlm_lens expects."]
    if missing:
        parts.append(f"missing ({len(missing)}): {_preview(missing)}")
    if extra:
        parts.append(f"unexpected ({len(extra)}): {_preview(extra)}")
    if hint:
        parts.append(hint)
    raise ValueError("\n".join(parts))


def require_known_prefixes(hf_model: Any, prefixes: tuple[str, ...]) -> None:
    """Raise when ``hf_model`` has a weight under none of ``prefixes``: a checkpoint variant whose extra
    weights the converter would otherwise ignore."""
    unknown = [name for name, _ in hf_model.named_parameters() if not name.startswith(prefixes)]
    if unknown:
        raise ValueError(f"{type(hf_model).__name__} has weights vlm_lens does not convert: {unknown[:12]}. "
                         "This checkpoint variant is not supported; loading stops rather than ignore them.")
