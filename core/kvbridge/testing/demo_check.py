"""A reusable end-to-end check: `kvbridge demo` on a transport, every byte verified."""

from __future__ import annotations

from typing import Any

from kvbridge.demo import DemoPlan, run_demo
from kvbridge.testing.rig import require_transport


def assert_demo_passes(transport: str, options: dict[str, Any] | None = None, **plan: Any) -> None:
    require_transport(transport)
    settings = {
        "prefill_tp": 2,
        "decode_tp": 2,
        "requests": 16,
        "max_prompt_tokens": 1024,
        "timeout": 300,
    }
    settings.update(plan)
    report = run_demo(
        DemoPlan(transport=transport, transport_options=dict(options or {}), **settings)
    )
    assert report.verify_errors == (), report.verify_errors
    assert report.committed == report.requests, report.failures
    assert report.pools_full
