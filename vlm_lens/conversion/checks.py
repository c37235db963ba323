"""Strict key and shape checks shared by the converters."""

from __future__ import annotations

from collections.abc import Iterable


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
