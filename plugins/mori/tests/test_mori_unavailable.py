"""Where mori.io is not installed, mori is listed as not loaded and selecting it says why and
how to fix it (decided without importing mori)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVBRIDGE_MORI_IO_MODULE="mori_io_that_is_not_installed")
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_transports_lists_mori_as_not_loaded_with_the_reason() -> None:
    result = run("from kvbridge.cli import main; main(['transports', '--json'])")
    (mori,) = [r for r in json.loads(result.stdout) if r["name"] == "mori"]
    assert mori["loaded"] is False
    assert "'mori_io_that_is_not_installed', which is not installed" in mori["error"]
    assert mori["fixes"] and "kvbridge-mori[amd]" in mori["fixes"][0]


def test_selecting_mori_gives_the_reason_as_a_clear_error() -> None:
    result = run(
        "from kvbridge import TransferConfig, Transport\n"
        "try:\n"
        "    Transport.from_config(TransferConfig(transport='mori'))\n"
        "except LookupError as exc:\n"
        "    print(exc)\n"
    )
    assert "transport 'mori' is installed but unusable" in result.stdout
    assert "not installed here" in result.stdout
    assert 'fix: pip install "kvbridge-mori[amd]"' in result.stdout
