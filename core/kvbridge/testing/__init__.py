"""Test helpers and the conformance kit for transport authors.

Two kinds of module live here:

- pytest-free helpers, safe on an install without the test extras (the demo and the
  benchmarks use them): :mod:`~kvbridge.testing.buffers` (``RankBuffers``, ``page_pattern``),
  :mod:`~kvbridge.testing.rig` (``TransferRig``, ``wait_until_terminal``),
  :mod:`~kvbridge.testing.remote` (``RemoteReceiver``) and :mod:`~kvbridge.testing.scrape`
  (``scrape``: a Prometheus endpoint as a dict; needs the ``metrics`` extra);
- the conformance kit, :mod:`~kvbridge.testing.conformance` (``TransportConformance``), which
  needs pytest (``pip install "kvbridge[test]"``).

Names are imported on first use, so ``import kvbridge.testing.buffers`` (or
``from kvbridge.testing import RankBuffers``) never imports pytest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ENV_REQUIRE": "kvbridge.testing.rig",
    "RankBuffers": "kvbridge.testing.buffers",
    "RemoteReceiver": "kvbridge.testing.remote",
    "TransferRig": "kvbridge.testing.rig",
    "TransportConformance": "kvbridge.testing.conformance",
    "TransportHang": "kvbridge.testing.rig",
    "page_pattern": "kvbridge.testing.buffers",
    "parse_metrics": "kvbridge.testing.scrape",
    "require_transport": "kvbridge.testing.rig",
    "scrape": "kvbridge.testing.scrape",
    "wait_until_terminal": "kvbridge.testing.rig",
}

__all__ = [
    "ENV_REQUIRE",
    "RankBuffers",
    "RemoteReceiver",
    "TransferRig",
    "TransportConformance",
    "TransportHang",
    "page_pattern",
    "parse_metrics",
    "require_transport",
    "scrape",
    "wait_until_terminal",
]

if TYPE_CHECKING:
    from kvbridge.testing.buffers import RankBuffers, page_pattern
    from kvbridge.testing.conformance import TransportConformance
    from kvbridge.testing.remote import RemoteReceiver
    from kvbridge.testing.rig import (
        ENV_REQUIRE,
        TransferRig,
        TransportHang,
        require_transport,
        wait_until_terminal,
    )
    from kvbridge.testing.scrape import parse_metrics, scrape


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbridge.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
