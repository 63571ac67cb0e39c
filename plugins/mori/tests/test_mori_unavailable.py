"""Where mori.io cannot be imported, mori is listed as not loaded and selecting it says why."""

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
    assert "mori_io_that_is_not_installed is not importable" in mori["error"]
    assert "amd-mori" in mori["error"]


def test_selecting_mori_gives_the_reason_as_a_clear_error() -> None:
    result = run(
        "from kvbridge import TransferConfig, Transport\n"
        "try:\n"
        "    Transport.from_config(TransferConfig(transport='mori'))\n"
        "except LookupError as exc:\n"
        "    print(exc)\n"
    )
    assert "transport 'mori' is installed but unusable" in result.stdout
    assert "not importable" in result.stdout
