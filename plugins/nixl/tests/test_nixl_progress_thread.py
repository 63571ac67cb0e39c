"""``progress_thread`` reaches the real NIXL agent, through the plugin loading path an engine uses.

NIXL's Python agent does not keep its configuration, so the tests read what it started: the
process's threads (``/proc/self/task``) before and after a manager is created. NIXL's progress
thread is a native thread; without it the plugin runs its own Python thread in its place.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pytest

from kvbridge.config import TransferConfig
from kvbridge.testing import TransportConformance, require_transport
from kvbridge.transport.facade import Transport, TransportManager
from kvbridge.types import MemoryRegion, RankIdentity, Role

KV = np.zeros(16 * 1024, dtype=np.uint8)
AUX = np.zeros(4 * 32, dtype=np.uint8)
OURS = "kvbridge-nixl-progress-"


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _create(options: dict[str, Any]) -> TransportManager:
    transport = Transport(require_transport("nixl"))
    config = TransferConfig(transport="nixl", transport_options=options)
    return transport.create_manager(
        config, RankIdentity(Role.DECODE), (MemoryRegion.of(KV, 1024),), (MemoryRegion.of(AUX, 32),)
    )


def _started(options: dict[str, Any]) -> tuple[int, list[str]]:
    """(native threads, names of Python threads) the manager started; checks close ends them."""
    before = _tasks()
    manager = _create(options)
    try:
        new = _tasks() - before
        python = {t.native_id: t.name for t in threading.enumerate() if t.native_id in new}
        started = (len(new - set(python)), sorted(python.values()))
    finally:
        manager.close()
    assert not _tasks() - before, "close left threads of the manager running"
    return started


def test_progress_thread_true_starts_nixls_thread_and_false_ours_instead() -> None:
    native_on, python_on = _started({"progress_thread": True})
    native_off, python_off = _started({"progress_thread": False})
    assert not any(name.startswith(OURS) for name in python_on), python_on
    assert [name.startswith(OURS) for name in python_off] == [True], python_off
    # The agent's own threads (UCX's async thread) are in both; NIXL's progress thread only
    # where it was asked for.
    assert native_on == native_off + 1, (native_on, native_off)


def test_default_is_off() -> None:
    native_default, python_default = _started({})
    native_off, _ = _started({"progress_thread": False})
    assert native_default == native_off
    assert [name.startswith(OURS) for name in python_default] == [True], python_default


@pytest.mark.parametrize("bad", ["yes", "true", 1, 0, None])
def test_a_bad_value_is_a_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"progress_thread must be true or false, got"):
        _create({"progress_thread": bad})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"writes_in_flight": 0}, r"writes_in_flight must be a whole number of at least 1 .* 0$"),
        ({"writes_in_flight": 2.5}, r"writes_in_flight must be .* got 2\.5"),
        ({"writes_in_flight": True}, r"writes_in_flight must be .* got True"),
        ({"writes_in_flight": "8"}, r"writes_in_flight must be .* got '8'"),
        ({"io_timeout": 0}, r"io_timeout must be a positive number of seconds, got 0"),
        ({"io_timeout": -1.0}, r"io_timeout must be .* got -1\.0"),
        ({"io_timeout": float("inf")}, r"io_timeout must be .* got inf"),
        ({"io_timeout": "30"}, r"io_timeout must be .* got '30'"),
    ],
)
def test_a_bad_write_option_is_a_clear_error_before_any_thread_starts(
    options: dict[str, Any], message: str
) -> None:
    before = _tasks()
    with pytest.raises(ValueError, match=message):
        _create(options)
    assert not _tasks() - before, "a refused configuration left threads running"


def test_writes_in_flight_sets_the_kits_window() -> None:
    manager = _create({"writes_in_flight": 3})
    try:
        assert manager.raw.writes_in_flight() == 3
        assert manager.raw.pipelines_writes()
    finally:
        manager.close()
    default = _create({})
    try:
        assert default.raw.writes_in_flight() == 64
    finally:
        default.close()


class TestNixlConformanceOneWriteInFlight(TransportConformance):
    """The whole kit with one room's writes in flight per peer at a time (``writes_in_flight``
    1): the window at its smallest still lands every room, in order, behind the fence."""

    transport_name = "nixl"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"backend": "UCX", "writes_in_flight": 1}


class TestNixlConformanceWithProgressThread(TransportConformance):
    """The whole kit with NIXL's progress thread on (the default, off, runs in
    test_nixl_conformance.py)."""

    transport_name = "nixl"

    @pytest.fixture
    def transport_options(self) -> dict[str, object]:
        return {"backend": "UCX", "progress_thread": True}
