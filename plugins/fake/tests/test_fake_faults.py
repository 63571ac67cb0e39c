"""The Fake transport's fault plan does what it says, through the real plugin dispatch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvbridge import ConfigError, KVPoll
from kvbridge.testing import TransferRig, wait_until_terminal
from kvbridge.testing.rig import load
from kvbridge_fake import FaultPlan

ROOM = 7
PAGES = np.array([1, 2, 3], dtype=np.int64)


def make_rig(faults: dict[str, Any]) -> TransferRig:
    transport, config = load("fake", {"faults": faults})
    return TransferRig(transport, config)


@pytest.fixture
def rigs() -> Iterator[list[TransferRig]]:
    made: list[TransferRig] = []
    yield made
    for rig in made:
        rig.close()


def test_fail_rooms_fails_only_that_room(rigs: list[TransferRig]) -> None:
    rig = make_rig({"fail_rooms": [ROOM]})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 0)
    rig.open(ROOM + 1, PAGES + 4, 1)
    statuses, failures = rig.receiver.receiver_poll(np.array([ROOM, ROOM + 1], dtype=np.uint64))
    assert statuses.tolist() == [KVPoll.Failed, KVPoll.Transferring]
    assert "injected" in failures[ROOM]


def test_fail_ranks_limits_the_fault_to_some_ranks(rigs: list[TransferRig]) -> None:
    rig = make_rig({"fail_rooms": [ROOM], "fail_ranks": [3]})  # rig managers are tp rank 0
    rigs.append(rig)
    rig.open(ROOM, PAGES, 0)
    statuses, _ = rig.receiver.receiver_poll(np.array([ROOM], dtype=np.uint64))
    assert statuses.tolist() == [KVPoll.Transferring]


def test_init_delay_holds_the_room_in_bootstrapping(rigs: list[TransferRig]) -> None:
    rig = make_rig({"delay": {"init": 0.3}})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 0)
    rooms = np.array([ROOM], dtype=np.uint64)
    assert rig.receiver.receiver_poll(rooms)[0][0] == KVPoll.Bootstrapping
    deadline = time.monotonic() + 10
    while rig.receiver.receiver_poll(rooms)[0][0] == KVPoll.Bootstrapping:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert rig.receiver.receiver_poll(rooms)[0][0] == KVPoll.Transferring


def test_send_delay_defers_completion_without_blocking_the_caller(
    rigs: list[TransferRig],
) -> None:
    rig = make_rig({"delay": {"send": 0.3}})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 0)
    rig.transfer(ROOM, PAGES, PAGES, 0, 0)
    assert rig.sender.sender_poll(np.array([ROOM], dtype=np.uint64))[0][0] == KVPoll.Transferring
    assert rig.wait_sender(ROOM, 10)[0] == KVPoll.Success


def test_ack_before_aux_reports_completion_before_the_stamp_lands(
    rigs: list[TransferRig],
) -> None:
    rig = make_rig({"aux_delay": 0.5, "ack_before_aux": True})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 2)
    rig.transfer(ROOM, PAGES, PAGES, 2, 2)
    assert rig.wait_sender(ROOM, 10)[0] == KVPoll.Success
    assert rig.decode.stamps[2] == 0, "the fault should land the aux row after completion"
    assert rig.decode.mismatches(ROOM, PAGES) == []
    deadline = time.monotonic() + 10
    while rig.decode.stamps[2] != ROOM:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert rig.decode.aux_matches(2, ROOM)


def test_late_aux_of_an_aborted_room_never_lands(rigs: list[TransferRig]) -> None:
    rig = make_rig({"aux_delay": 0.2, "ack_before_aux": True})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 2)
    rig.transfer(ROOM, PAGES, PAGES, 2, 2)
    assert rig.wait_sender(ROOM, 10)[0] == KVPoll.Success
    rig.receiver.receiver_abort(ROOM, "gave up")
    rig.receiver.receiver_clear(ROOM)
    time.sleep(0.5)
    assert rig.decode.stamps[2] == 0


def test_gone_rank_fails_senders_quickly(rigs: list[TransferRig]) -> None:
    rig = make_rig({"gone_ranks": [0]})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 0)
    rig.transfer(ROOM, PAGES, PAGES, 0, 0)
    status, reason = wait_until_terminal(rig.sender.sender_poll, ROOM, 10)
    assert status == KVPoll.Failed and "gone" in reason


def test_faults_from_the_environment_override_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBRIDGE_FAKE_FAULTS", '{"fail_rooms": [9]}')
    plan = FaultPlan.from_options({"faults": {"fail_rooms": [1], "aux_delay": 0.1}})
    assert plan.fail_rooms == {9} and plan.aux_delay == 0.1


@pytest.mark.parametrize(
    ("faults", "env", "message"),
    [
        ({"explode": 1}, None, "unknown fake fault"),
        ({"delay": {"poll": 1}}, None, "cannot delay"),
        ({}, "[1, 2", "must be a JSON object"),
    ],
)
def test_bad_fault_plans_are_refused(faults: dict, env: str | None, message: str) -> None:
    environ = {"KVBRIDGE_FAKE_FAULTS": env} if env else {}
    with pytest.raises(ConfigError, match=message):
        FaultPlan.from_options({"faults": faults}, environ)


def test_unknown_transport_option_is_refused() -> None:
    transport, config = load("fake", {"hots": "127.0.0.1"})
    with pytest.raises(ValueError, match="unknown fake transport option"):
        TransferRig(transport, config)


def test_discard_kv_lands_the_aux_row_but_not_the_pages(rigs: list[TransferRig]) -> None:
    rig = make_rig({"discard_kv_ranks": [0]})
    rigs.append(rig)
    rig.open(ROOM, PAGES, 2)
    rig.transfer(ROOM, PAGES, PAGES, 2, 2)
    assert rig.wait_sender(ROOM, 10)[0] == KVPoll.Success
    assert rig.decode.aux_matches(2, ROOM)
    assert len(rig.decode.mismatches(ROOM, PAGES)) == len(PAGES) * len(rig.decode.kv)
    assert all(not region[PAGES].any() for region in rig.decode.kv)


def test_discard_kv_rooms_spares_the_other_rooms(rigs: list[TransferRig]) -> None:
    rig = make_rig({"discard_kv_rooms": [ROOM]})
    rigs.append(rig)
    other = PAGES + 4
    rig.open(ROOM, PAGES, 2)
    rig.open(ROOM + 1, other, 3)
    rig.transfer(ROOM, PAGES, PAGES, 2, 2)
    rig.transfer(ROOM + 1, other, other, 3, 3)
    assert rig.wait_sender(ROOM, 10)[0] == KVPoll.Success
    assert rig.wait_sender(ROOM + 1, 10)[0] == KVPoll.Success
    assert rig.decode.aux_matches(2, ROOM) and rig.decode.aux_matches(3, ROOM + 1)
    assert len(rig.decode.mismatches(ROOM, PAGES)) == len(PAGES) * len(rig.decode.kv)
    assert rig.decode.mismatches(ROOM + 1, other) == []
