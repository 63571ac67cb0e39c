from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: Set by .ci/sglang: a missing SGLang fails the end-to-end tests instead of skipping them.
REQUIRED = os.environ.get("KVBRIDGE_SGLANG_REQUIRED") == "1"


def require_sglang() -> None:
    try:
        import sglang  # noqa: F401
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"SGLang is required here (KVBRIDGE_SGLANG_REQUIRED=1): {exc}")
        pytest.skip("SGLang is not installed (bash adapters/sglang/scripts/make_env.sh)")


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_sglang()
    from kvbridge.testing.tiny_model import build

    return build(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sglang-logs")
