"""What kvbridge-sglang supports, checked when SGLang loads the plugin and builds a manager.

kvbridge-sglang does not depend on the ``sglang`` distribution (it pins its own torch and CUDA
kernels): it reads the installed SGLang's version and refuses, naming the SGLang flag or the
override, what it has not been built or tested for. SGLang's disaggregation internals change
between patch releases, so the check is on the full version.
"""

from __future__ import annotations

import os
from typing import Any

#: SGLang releases this backend was written against and tested with.
TESTED = ((0, 5, 23),)
ALLOW_UNTESTED_ENV = "KVBRIDGE_SGLANG_ALLOW_UNTESTED"


class Unsupported(RuntimeError):
    """An SGLang version or setting kvbridge-sglang does not support yet."""


def parse_version(text: str) -> tuple[int, int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]), int("".join(c for c in parts[2] if c.isdigit()))
    except (IndexError, ValueError):
        raise Unsupported(f"cannot read the SGLang version {text!r}") from None


def check_version(text: str | None = None) -> str:
    """Refuse SGLang releases outside :data:`TESTED` (``KVBRIDGE_SGLANG_ALLOW_UNTESTED=1``)."""
    if text is None:
        from importlib.metadata import version

        text = version("sglang")
    if parse_version(text) not in TESTED and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        tested = ", ".join(".".join(map(str, v)) for v in TESTED)
        raise Unsupported(
            f"kvbridge-sglang was tested with SGLang {tested}; this is SGLang {text}. SGLang's "
            f"transfer backend API changes between releases: set {ALLOW_UNTESTED_ENV}=1 to try "
            f"anyway"
        )
    return text


def check_server_args(server_args: Any) -> None:
    """Refuse settings the backend does not support yet, naming the SGLang flag."""
    problems = []

    def get(name: str, default: Any = None) -> Any:
        return getattr(server_args, name, default)

    if (get("pp_size", 1) or 1) != 1:
        problems.append(f"pipeline parallelism ({get('pp_size')}): use --pp-size 1")
    if get("enable_dp_attention", False) and (get("dp_size", 1) or 1) > 1:
        problems.append(
            f"DP attention with --dp-size {get('dp_size')}: run one instance per replica "
            f"(--dp-size 1) for now"
        )
    if get("speculative_algorithm") is not None:
        problems.append(
            f"speculative decoding ({get('speculative_algorithm')}): its draft KV is not "
            f"described to kvbridge yet; drop --speculative-algorithm"
        )
    if get("enable_hierarchical_cache", False):
        problems.append("the hierarchical cache: drop --enable-hierarchical-cache")
    if problems:
        raise Unsupported("kvbridge-sglang does not support " + "; ".join(problems))
