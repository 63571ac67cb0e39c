"""The `kvbridge` command, run as a user runs it: a real process and the installed plugins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_transports_json_lists_fake_as_loaded() -> None:
    # The console script next to this interpreter, as `pip install` put it there.
    exe = Path(sys.executable).with_name("kvbridge")
    assert exe.exists(), "the kvbridge console script is not installed"
    result = run(str(exe), "transports", "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    (fake,) = [r for r in records if r["name"] == "fake"]
    assert fake["loaded"] is True and fake["error"] is None
    assert fake["distribution"] == "kvbridge-fake"
    for key in ("name", "distribution", "version", "api_version", "loaded", "error"):
        assert key in fake


def test_python_dash_m_prints_a_table() -> None:
    result = run(sys.executable, "-m", "kvbridge", "transports")
    assert result.returncode == 0, result.stderr
    assert "fake" in result.stdout and "loaded" in result.stdout


def test_blocked_transport_shows_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    env = dict(os.environ, KVBRIDGE_TRANSPORTS_BLOCK="fake")
    result = run(sys.executable, "-m", "kvbridge", "transports", "--json", env=env)
    (fake,) = [r for r in json.loads(result.stdout) if r["name"] == "fake"]
    assert fake["loaded"] is False and "blocked" in fake["error"]
