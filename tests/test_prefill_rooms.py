"""The prefill machine on its own: decode ranks' messages in, decisions out; no transport,
sockets or clock (the time is an argument)."""

from __future__ import annotations

import numpy as np

from kvbridge.protocol.columns import SUCCESS
from kvbridge.protocol.messages import Abort, Metadata, Register, Waiting
from kvbridge.protocol.plan import DecodePeer
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.protocol.prefill_rooms import (
    Acknowledge,
    Drained,
    PrefillRooms,
    Refused,
    StartSending,
    StopSending,
    Tell,
)

PAGE = 4096
KV = ((1 << 20, 16 * PAGE, PAGE, "cpu"),)
AUX = ((1 << 30, 8 * 64, 64, "cpu"),)


def machine() -> PrefillRooms:
    return PrefillRooms(authoritative=True, bootstrap_timeout=5.0, waiting_timeout=5.0)


def register(rooms: PrefillRooms, key: str) -> DecodePeer:
    assert rooms.on_message(Register(key, {"id": key}, KV, AUX, f"tcp://{key}:1"), 0.0) == []
    return rooms.decode_peers[key]


def metadata(room: int, key: str) -> Metadata:
    return Metadata(room, key, np.arange(2), 0, 1, (0, 0, PAGE))


def test_metadata_binds_the_room_and_starts_the_sender() -> None:
    rooms = machine()
    register(rooms, "d0")
    register(rooms, "d1")
    rooms.add([PrefillRequest(7)], 0.0)
    assert rooms.on_message(metadata(7, "d0"), 0.1) == [StartSending(7, ({"id": "d0"},))]
    # bound: another registered decode rank may no longer point the room elsewhere
    (refused,) = rooms.on_message(metadata(7, "d1"), 0.2)
    assert isinstance(refused, Refused) and "already bound" in refused.what
    assert rooms.untrusted == 1
    assert rooms.requested_pages(7) == 2


def test_an_abort_is_acknowledged_only_once_the_transport_drained() -> None:
    rooms = machine()
    peer = register(rooms, "d0")
    rooms.add([PrefillRequest(7)], 0.0)
    rooms.on_message(metadata(7, "d0"), 0.0)
    assert rooms.on_message(Abort.of(7, "d0", "client gone"), 0.1) == []
    step = rooms.queue.apply(rooms.queue.local_statuses(np.array([2], np.uint8), {}, 0.2))
    (aborted,) = step.aborted
    assert rooms.finish(step, 0.2) == [
        StopSending(7, aborted.reason),
        Tell(7, (peer,), False, aborted.reason),
    ]
    draining = rooms.draining_rooms()
    assert draining.tolist() == [7]
    assert rooms.drained(draining, np.array([False])) == []  # still landing: no word yet
    assert rooms.drained(draining, np.array([True])) == [Drained(7), Acknowledge(7, (peer,))]
    # decode still asking about it later is told why, and acknowledged at once
    lease = Waiting("d0", np.array([7], dtype=np.uint64))
    assert rooms.on_message(lease, 0.3) == [
        Tell(7, (peer,), False, aborted.reason),
        Acknowledge(7, (peer,)),
    ]


def test_completions_are_told_once_to_the_ranks_written_to() -> None:
    rooms = machine()
    peer = register(rooms, "d0")
    rooms.add([PrefillRequest(7)], 0.0)
    rooms.on_message(metadata(7, "d0"), 0.0)
    done = np.array([SUCCESS], dtype=np.uint8)
    assert rooms.announce(done) == [Tell(7, (peer,), True)]
    assert rooms.announce(done) == []


def test_a_non_authoritative_cp_rank_ignores_metadata() -> None:
    rooms = PrefillRooms(authoritative=False, bootstrap_timeout=5.0, waiting_timeout=5.0)
    register(rooms, "d0")
    rooms.add([PrefillRequest(7)], 0.0)
    assert rooms.on_message(metadata(7, "d0"), 0.0) == []
    assert rooms.targets(7) is None


def test_a_transport_that_cannot_tell_counts_as_drained() -> None:
    """A plugin for API 1.0 has no ``kvbridge_sender_drained``: its aborts are acknowledged
    at once (it never promised the fence)."""
    rooms = machine()
    peer = register(rooms, "d0")
    rooms.add([PrefillRequest(7)], 0.0)
    rooms.on_message(metadata(7, "d0"), 0.0)
    rooms.on_message(Abort.of(7, "d0", "client gone"), 0.0)
    step = rooms.queue.apply(rooms.queue.local_statuses(np.array([2], np.uint8), {}, 0.1))
    rooms.finish(step, 0.1)
    assert rooms.drained(rooms.draining_rooms(), None) == [Drained(7), Acknowledge(7, (peer,))]
    assert rooms.draining == 0


def test_a_decode_rank_yet_to_send_its_metadata_may_abort_until_the_room_is_bound() -> None:
    """Decode TP 2 into one prefill rank: d0's metadata is here, d1's client went away before
    d1 sent its own. d1 is one of the room's decode ranks (the room is not bound yet), so its
    abort counts; refusing it left the room waiting for metadata that never comes. Once bound,
    a registered rank that is not among the room's decode ranks is still refused."""
    rooms = machine()
    register(rooms, "d0")
    register(rooms, "d1")
    register(rooms, "d2")
    rooms.add([PrefillRequest(7), PrefillRequest(8)], 0.0)

    def two(room: int, key: str) -> Metadata:
        return Metadata(room, key, np.arange(2), 0, 2, (0, 0, PAGE))

    assert rooms.on_message(two(7, "d0"), 0.1) == []
    assert rooms.on_message(Abort.of(7, "d1", "client gone"), 0.2) == []
    assert rooms.untrusted == 0
    step = rooms.queue.apply(rooms.queue.local_statuses(np.array([2, 2], np.uint8), {}, 0.3))
    assert [a.room for a in step.aborted] == [7]
    assert "client gone" in step.aborted[0].reason

    rooms.on_message(two(8, "d0"), 0.1)
    assert isinstance(rooms.on_message(two(8, "d1"), 0.1)[0], StartSending)
    (refused,) = rooms.on_message(Abort.of(8, "d2", "forged"), 0.4)
    assert isinstance(refused, Refused) and "not its decode rank" in refused.what


def test_a_registration_flood_without_a_secret_cannot_grow_the_table() -> None:
    """Issue 22, defect 4 (registrations): every new key used to stay for good."""
    rooms = PrefillRooms(
        authoritative=True, bootstrap_timeout=5.0, waiting_timeout=5.0, max_decode_peers=8
    )
    register(rooms, "d0")
    rooms.add([PrefillRequest(7)], 0.0)
    rooms.on_message(metadata(7, "d0"), 0.0)  # d0 has a room in flight: never swept
    refused = 0
    for t, n in enumerate(range(1000)):
        out = rooms.on_message(Register(f"forged{n}", {"id": n}, KV, AUX, "tcp://x:1"), 0.01 * t)
        refused += sum(isinstance(d, Refused) for d in out)
        assert len(rooms.decode_peers) <= 8
    # 10 s of flood: the table filled once and was swept twice (every bootstrap_timeout).
    assert refused >= 1000 - 3 * 7 and rooms.untrusted == refused
    # Silent registrations nothing refers to are swept after bootstrap_timeout; d0 stays.
    assert rooms.on_message(Register("d1", {"id": "d1"}, KV, AUX, "tcp://d1:1"), 20.0) == []
    assert {"d0", "d1"} <= set(rooms.decode_peers)
    assert rooms.targets(7) is not None
