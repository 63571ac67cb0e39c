"""Library code never imports test-only packages: the CLI, the demo and the pytest-free helpers
run where pytest and hypothesis are not importable (as on `pip install kvbridge`).

Each check runs a real process with a directory first on PYTHONPATH whose ``pytest``,
``_pytest`` and ``hypothesis`` raise ImportError on import; spawned children inherit it.
(CI's `.ci/wheels` also installs the built wheels into a fresh venv without the extras.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKED = ("pytest", "_pytest", "hypothesis")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    for name in BLOCKED:
        (tmp_path / f"{name}.py").write_text(
            f"raise ImportError('{name} is a test-only package (blocked by this test)')\n"
        )
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_the_blocker_blocks(env: dict[str, str]) -> None:
    result = run(env, "-c", "import pytest")
    assert result.returncode != 0 and "test-only package" in result.stderr


def test_every_library_module_imports_without_test_packages(env: dict[str, str]) -> None:
    # Everything but the kit itself (conformance: pytest by design), the pytest plugin, and
    # __main__ (it runs the CLI).
    code = """
import importlib, pkgutil, sys
import kvbridge
needs_pytest = {"kvbridge.testing.conformance", "kvbridge.testing.pytest_plugin",
                "kvbridge.__main__"}
names = [m.name for m in pkgutil.walk_packages(kvbridge.__path__, "kvbridge.")]
for name in names:
    if name not in needs_pytest:
        importlib.import_module(name)
from kvbridge.testing import RankBuffers, RemoteReceiver, TransferRig, wait_until_terminal
for plugin in ("kvbridge_fake.plugin", "kvbridge_fake.manager"):
    importlib.import_module(plugin)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"pytest", "_pytest", "hypothesis"})
assert not leaked, leaked
print(len(names), "modules")
"""
    result = run(env, "-c", code)
    assert result.returncode == 0, result.stderr
    assert "modules" in result.stdout


def test_benchmark_module_imports_without_test_packages(env: dict[str, str]) -> None:
    code = (
        "import runpy, sys; sys.argv = ['x', '--help']\n"
        f"runpy.run_path({str(REPO / 'benchmarks' / 'transport_throughput.py')!r}, "
        "run_name='__main__')"
    )
    result = run(env, "-c", code)
    assert result.returncode == 0, result.stderr


def test_transports_command_without_test_packages(env: dict[str, str]) -> None:
    result = run(env, "-m", "kvbridge", "transports")
    assert result.returncode == 0, result.stderr
    assert "fake" in result.stdout


@pytest.mark.multiprocess
def test_demo_runs_without_test_packages(env: dict[str, str]) -> None:
    result = run(
        env,
        "-m",
        "kvbridge",
        "demo",
        "--prefill-tp",
        "1",
        "--decode-tp",
        "1",
        "--requests",
        "4",
        "--max-prompt-tokens",
        "256",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


LIBRARY_ROOTS = [
    REPO / "core" / "kvbridge",
    *sorted((REPO / "plugins").glob("*/kvbridge_*")),
    REPO / "adapters" / "vllm" / "kvbridge_vllm",
]


def test_no_library_module_imports_test_code() -> None:
    """The kit (``kvbridge.testing``), pytest and hypothesis are for tests; nothing a user's
    pip install runs may import them (the kit itself, under testing/, is the exception)."""
    import ast

    offenders = []
    for root in LIBRARY_ROOTS:
        for path in root.rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if "/testing/" in rel:
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                for name in names:
                    top = name.split(".")
                    if top[0] in BLOCKED or top[:2] == ["kvbridge", "testing"]:
                        offenders.append(f"{rel}:{node.lineno} imports {name}")
    assert not offenders, offenders
