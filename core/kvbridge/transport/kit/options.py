"""A transport's own settings, merged over its defaults (``transport_options`` in the config)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def transport_options(
    name: str, given: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge a transport's options over its defaults; unknown keys are a clear error."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} transport option(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}
