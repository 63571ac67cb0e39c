"""pytest plugin (entry point ``pytest11: kvbridge``): reports which transports are installed.

The conformance kit itself is plain classes in :mod:`kvbridge.testing`; this plugin only adds a
report header so a CI log shows which transports (and load errors) the run saw.
"""

from __future__ import annotations

import pytest


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        from kvbridge.transport.loading import TransportRegistry

        records = TransportRegistry.discover().records()
    except Exception as exc:  # a broken install must not break unrelated test suites
        return [f"kvbridge transports: unavailable ({exc})"]
    parts = [f"{r.name}={'loaded' if r.loaded else 'NOT LOADED'}" for r in records]
    return ["kvbridge transports: " + (", ".join(parts) or "none")]
