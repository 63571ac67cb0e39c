"""Plugin API versions mean something, and a missing native library is reported, with the
command that fixes it, without importing it."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvbridge import RankIdentity, Role, TransferConfig, Transport, TransportRegistry
from kvbridge.native import NativeLibraryMissing, check_native, python_module, shared_library
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.transport.kit import BookedManager, ManagerHooks
from kvbridge.transport.loading import TRANSPORT_GROUP
from sample_plugins.recording import written_for_1_0

MAJOR, MINOR = (int(x) for x in KVBRIDGE_API_VERSION.split("."))


def hooks(api_version: str) -> ManagerHooks:
    return ManagerHooks("written_for", BookedManager, api_version=api_version)


def test_managerhooks_reports_the_version_the_plugin_states_not_the_cores() -> None:
    assert hooks("1.0").kvbridge_transport_info().api_version == "1.0"


def test_a_managerhooks_plugin_from_before_api_version_loads_as_1_0_with_a_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ManagerHooks took no ``api_version=`` while the API was 1.0; such a plugin must still
    import and load (an older minor of the same major), saying which version it is taken as."""
    with caplog.at_level(logging.INFO, logger="kvbridge"):
        plugin = ManagerHooks("pre_versioned", BookedManager)
        record = TransportRegistry().register("pre_versioned", plugin)
    assert record.loaded, record.error
    assert record.api_version == "1.0"
    notes = [r.getMessage() for r in caplog.records if "pre_versioned" in r.getMessage()]
    assert any("api_version" in n and "1.0" in n for n in notes), notes
    assert any(KVBRIDGE_API_VERSION in n for n in notes), notes


def test_a_plugin_stating_a_minor_without_the_hooks_it_added_is_refused_naming_them() -> None:
    eps = [
        md.EntryPoint("claims_1_1", "sample_plugins.recording:claims_1_1", TRANSPORT_GROUP),
        md.EntryPoint(
            "written_for_1_0", "sample_plugins.recording:written_for_1_0", TRANSPORT_GROUP
        ),
    ]
    registry = TransportRegistry.discover(eps, environ={})
    records = {r.name: r for r in registry.records()}
    refused = records["claims_1_1"]
    assert not refused.loaded
    assert "kvbridge_sender_drained" in (refused.error or ""), refused.error
    assert "1.1" in (refused.error or "")
    assert records["written_for_1_0"].loaded, records["written_for_1_0"].error
    assert registry.names() == ["written_for_1_0"]


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (f"{MAJOR + 1}.0", "built for kvbridge plugin API"),
        (f"{MAJOR}.{MINOR + 1}", "newer than this kvbridge"),
        ("one.zero", "MAJOR.MINOR"),
    ],
)
def test_a_plugin_written_for_another_api_is_refused(version: str, why: str) -> None:
    record = TransportRegistry().register("written_for", hooks(version))
    assert not record.loaded
    assert why in (record.error or ""), record.error
    assert KVBRIDGE_API_VERSION in (record.error or "") or why == "MAJOR.MINOR"


@pytest.mark.parametrize("version", [f"{MAJOR}.0", KVBRIDGE_API_VERSION])
def test_a_plugin_written_for_this_or_an_older_minor_loads(version: str) -> None:
    record = TransportRegistry().register("written_for", hooks(version))
    assert record.loaded, record.error
    assert record.api_version == version


def test_every_shipped_plugin_states_a_literal_version() -> None:
    for name in ("fake", "mooncake", "nixl"):
        module = __import__(f"kvbridge_{name}.plugin", fromlist=["plugin"])
        assert module.plugin.info.api_version == module.API_VERSION
        assert isinstance(module.API_VERSION, str) and module.API_VERSION.count(".") == 1


def test_missing_native_library_is_not_loaded_with_the_fix() -> None:
    eps = [md.EntryPoint("needs_native", "sample_plugins.needs_native:plugin", TRANSPORT_GROUP)]
    registry = TransportRegistry.discover(eps, environ={})
    (record,) = registry.records()
    assert not record.loaded
    assert "kvbridge_no_such_native_binding" in (record.error or "")
    assert "libkvbridge_no_such_lib" in (record.error or "")
    assert record.fixes == (
        "pip install kvbridge-no-such[cpu]",
        "apt-get install libkvbridge-no-such1",
    )
    assert record.to_json()["fixes"] == list(record.fixes)
    with pytest.raises(LookupError, match=r"fix: pip install kvbridge-no-such\[cpu\]"):
        registry.get("needs_native")


def test_present_things_pass_and_the_check_imports_nothing(tmp_path: Path) -> None:
    # A module that would explode if imported: find_spec must only find it.
    (tmp_path / "kvbridge_exploding_binding.py").write_text("raise SystemExit('imported!')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        check_native(
            "ok",
            python_module("kvbridge_exploding_binding", fix="-"),
            python_module("no_such_x", "json", fix="-"),  # any alternative will do
            shared_library("c", fix="-"),
        )
        assert "kvbridge_exploding_binding" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
    with pytest.raises(NativeLibraryMissing) as info:
        check_native("t", python_module("no_such_x", fix="do a"), python_module("json", fix="b"))
    assert info.value.fixes == ("do a",)
    with pytest.raises(ValueError, match="top-level"):
        python_module("mori.io", fix="-")


def test_cli_says_not_loaded_and_prints_the_fix(tmp_path: Path) -> None:
    # The real NIXL plugin on a machine where no nixl module can be found (find_spec says so).
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "def find_spec(name, package=None):\n"
        "    if name.split('.')[0] in ('nixl', 'nixl_cu12', 'nixl_cu13'):\n"
        "        return None\n"
        "    return real(name, package)\n"
        "importlib.util.find_spec = find_spec\n"
        "from kvbridge.cli import main\n"
        "main(['transports'])\n"
        "print('=== json ===')\n"
        "main(['transports', '--json'])\n"
        "assert 'nixl' not in sys.modules and 'nixl_cu12' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    table, _, rest = result.stdout.partition("=== json ===")
    (row,) = [line for line in table.splitlines() if line.startswith("nixl ")]
    assert "NOT LOADED" in row
    assert 'fix: pip install "kvbridge-nixl[cpu]"' in table
    (nixl,) = [r for r in json.loads(rest) if r["name"] == "nixl"]
    assert nixl["loaded"] is False and nixl["fixes"]


def test_a_transport_for_api_1_0_cannot_tell_whether_an_abort_drained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The facade reports that it cannot tell (None), with one warning; what that means for
    the fence is the protocol's (``PrefillRooms.drained``)."""
    registry = TransportRegistry()
    assert registry.register("written_for_1_0", written_for_1_0).loaded
    transport = Transport(registry.get("written_for_1_0"))
    manager = transport.create_manager(
        TransferConfig(transport="written_for_1_0"), RankIdentity(Role.PREFILL), (), ()
    )
    with caplog.at_level(logging.WARNING, logger="kvbridge"):
        assert manager.sender_drained(np.array([3], dtype=np.uint64)) is None
        assert manager.sender_drained(np.array([4], dtype=np.uint64)) is None
    assert sum("predates kvbridge_sender_drained" in r.getMessage() for r in caplog.records) == 1
