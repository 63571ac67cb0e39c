"""Whatever ends a room on one side reaches the other side, and waiting for memory is not a
failure (real sockets, real bootstrap, the Fake transport, small timeouts)."""

from __future__ import annotations

import re
import time

import pytest
from integrity_rig import Decode, Prefill, add_room, run_for, run_until

from kvbridge import TransferConfig
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.prefill import PrefillRequest

DROPPED = re.compile(r"(\d+) aborts for prefill 127\.0\.0\.1:9 dropped")

pytestmark = pytest.mark.multiprocess
PAGES = 16


def _commit(decode: Decode, prefill: Prefill, room: int, pages: int, fill: int) -> None:
    add_room(decode, prefill, room, pages)
    run_until(f"{room} ready", lambda: room in prefill.ready, decode, prefill)
    prefill.send(room, fill=fill)
    run_until(f"{room} committed", lambda: room in decode.committed, decode, prefill)


def test_an_oversized_request_fails_at_once_naming_sizes_and_blocks_nobody() -> None:
    config = TransferConfig(transport="fake", bootstrap_timeout=30.0, heartbeat_interval=0.3)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _commit(decode, prefill, 1, PAGES, 0x10)  # the decode rank now knows this prefill
        decode.pool.free(decode.committed[1].pages)
        add_room(decode, prefill, 2, PAGES + 1)
        add_room(decode, prefill, 3, PAGES)
        run_until("room 2 failed on decode", lambda: 2 in decode.aborted, decode, prefill)
        assert decode.aborted[2] == (
            f"request needs {PAGES + 1} pages but the decode page pool holds only {PAGES}"
        )
        # The prefill hears of it long before its own bootstrap_timeout (30 s) ...
        run_until("prefill told", lambda: 2 in prefill.aborted, decode, prefill, timeout=10)
        assert "decode aborted" in prefill.aborted[2] and f"{PAGES + 1} pages" in prefill.aborted[2]
        # ... and the request behind it is not blocked.
        run_until("room 3 ready", lambda: 3 in prefill.ready, decode, prefill)
        prefill.send(3, fill=0x30)
        run_until("room 3 committed", lambda: 3 in decode.committed, decode, prefill)
        assert decode.pages_hold(3, 0x30)
    finally:
        decode.close()
        prefill.close()


def test_a_failure_before_decode_ever_looked_the_prefill_up_still_reaches_it() -> None:
    """The first request to a new prefill fails on decode at once (before its bootstrap
    answer came): the abort waits for that answer instead of being dropped, so the prefill,
    which has the room already (the router sends both legs at once), is told with the cause
    and does not hold it until its own bootstrap_timeout."""
    config = TransferConfig(transport="fake", bootstrap_timeout=30.0, heartbeat_interval=0.3)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        assert decode.node.directory.addresses == []  # nothing looked up yet
        add_room(decode, prefill, 4, PAGES + 1)
        run_until("room 4 failed on decode", lambda: 4 in decode.aborted, decode, prefill)
        run_until("prefill told", lambda: 4 in prefill.aborted, decode, prefill, timeout=10)
        assert "decode aborted" in prefill.aborted[4] and f"{PAGES + 1} pages" in prefill.aborted[4]
        _commit(decode, prefill, 5, PAGES, 0x50)  # and the pair works on
        assert decode.pages_hold(5, 0x50)
    finally:
        decode.close()
        prefill.close()


def test_a_request_the_engine_abandons_before_adding_it_reaches_the_prefill() -> None:
    """``DecodeNode.abandon``: an engine that gave up on a request before adding it (still
    waiting for memory) tells the prefill holding the room, on a fresh pair too."""
    config = TransferConfig(transport="fake", bootstrap_timeout=30.0, heartbeat_interval=0.3)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        prefill.node.add([PrefillRequest(6)])
        decode.node.abandon(6, prefill.addr, "client gone while waiting for memory")
        run_until("prefill told", lambda: 6 in prefill.aborted, decode, prefill, timeout=10)
        reason = prefill.aborted[6]
        assert reason.startswith("decode aborted: decode ") and reason.endswith(
            ": client gone while waiting for memory"
        ), reason
        prefill.node.add([PrefillRequest(7)])
        decode.node.abandon(7, prefill.addr, "another rank's failure", follows=True)
        run_until("prefill told 7", lambda: 7 in prefill.aborted, decode, prefill, timeout=10)
        assert "another rank's failure" not in prefill.aborted[7]  # never a root cause
        _commit(decode, prefill, 8, PAGES, 0x80)
    finally:
        decode.close()
        prefill.close()


def test_aborts_for_a_prefill_that_never_answers_are_bounded_and_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients name the bootstrap address: aborts waiting for an answer that never comes are
    kept at most ``MAX_HELD_ABORTS`` and only for ``bootstrap_timeout``."""
    from kvbridge.runtime import decode_node

    monkeypatch.setattr(decode_node, "MAX_HELD_ABORTS", 2)
    config = TransferConfig(
        transport="fake", bootstrap_timeout=1.0, bootstrap_http_timeout=0.2, heartbeat_interval=0.3
    )
    decode = Decode(config, PAGES)
    try:
        caplog.set_level("INFO", logger="kvbridge")
        decode.node.add([DecodeRequest(room, PAGES + 1, "127.0.0.1:9") for room in (1, 2, 3)])
        run_until("all failed", lambda: len(decode.aborted) == 3, decode)
        assert "room 3: 2 aborts already wait for bootstrap answers" in caplog.text

        def dropped() -> int:
            # Each abort is held from its own room's failure, so the two may expire in
            # different steps and be logged as one line each.
            found = (DROPPED.match(r.getMessage()) for r in caplog.records)
            return sum(int(m.group(1)) for m in found if m)

        run_until("the waiting aborts given up", lambda: dropped() == 2, decode, timeout=10)
        run_for(0.5, decode)
        assert dropped() == 2  # each held abort is given up once, the refused one never
    finally:
        decode.close()


def test_waiting_for_decode_memory_does_not_time_out_the_prefill() -> None:
    config = TransferConfig(
        transport="fake", bootstrap_timeout=1.0, heartbeat_interval=0.2, waiting_timeout=30.0
    )
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _commit(decode, prefill, 11, PAGES, 0x11)  # the engine keeps these pages a while
        add_room(decode, prefill, 12, PAGES)
        started = time.monotonic()
        run_for(3 * config.bootstrap_timeout, decode, prefill)
        assert 12 not in prefill.aborted and 12 not in decode.aborted
        assert time.monotonic() - started > config.bootstrap_timeout
        decode.pool.free(decode.committed[11].pages)  # decoding of room 11 ends
        run_until("room 12 ready", lambda: 12 in prefill.ready, decode, prefill)
        prefill.send(12, fill=0x12)
        run_until("room 12 committed", lambda: 12 in decode.committed, decode, prefill)
    finally:
        decode.close()
        prefill.close()


def test_prefill_bootstrap_timeout_still_fires_when_decode_never_comes() -> None:
    config = TransferConfig(transport="fake", bootstrap_timeout=0.5, heartbeat_interval=0.2)
    prefill = Prefill(config, PAGES)
    try:
        prefill.node.add([PrefillRequest(21)])
        run_until("room 21 timed out", lambda: 21 in prefill.aborted, prefill, timeout=10)
        assert "bootstrap_timeout" in prefill.aborted[21]
    finally:
        prefill.close()


def test_prefill_failing_a_room_before_decode_metadata_tells_decode_when_it_arrives() -> None:
    config = TransferConfig(
        transport="fake", bootstrap_timeout=0.5, heartbeat_interval=0.2, waiting_timeout=30.0
    )
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _commit(decode, prefill, 31, PAGES, 0x31)  # holds the pool
        prefill.node.add([PrefillRequest(32)])
        run_until("prefill gave up on 32", lambda: 32 in prefill.aborted, prefill)
        decode.add(32, PAGES, prefill)  # decode hears of it late, then waits for memory
        decode.pool.free(decode.committed[31].pages)
        # Whether the memory lease or the metadata reaches the prefill first, it answers with
        # its failure (and, as it writes nothing, the abort acknowledgement that lifts the fence).
        run_until("decode told", lambda: 32 in decode.aborted, decode, prefill, timeout=5)
        assert "bootstrap_timeout" in decode.aborted[32]
        run_until("memory back", lambda: decode.pool.num_free == PAGES, decode, prefill, timeout=5)
    finally:
        decode.close()
        prefill.close()


def test_root_causes_cross_with_their_origin_and_echoes_stay_echoes() -> None:
    from kvbridge.protocol.messages import Status

    decode_config = TransferConfig(transport="fake", waiting_timeout=30.0, heartbeat_interval=1.0)
    # The prefill's transport fails room 41 itself; nothing fails on decode.
    prefill_config = TransferConfig(
        transport="fake",
        heartbeat_interval=1.0,
        transport_options={"faults": {"fail_rooms": [41]}},
    )
    prefill, decode = Prefill(prefill_config, PAGES), Decode(decode_config, PAGES)
    try:
        add_room(decode, prefill, 41, PAGES)
        run_until("41 ready", lambda: 41 in prefill.ready or 41 in prefill.aborted, decode, prefill)
        run_until("decode told", lambda: 41 in decode.aborted, decode, prefill)
        assert decode.aborted[41].startswith(f"prefill {prefill.node.key}: "), decode.aborted[41]
        assert "failed on another rank" not in decode.aborted[41]

        # A prefill rank that only followed another prefill rank's failure says so, and the
        # decode rank it tells reports "failed on another rank", not an echo as its cause.
        add_room(decode, prefill, 42, PAGES)
        run_until("42 ready", lambda: 42 in prefill.ready, decode, prefill)
        control = decode.node.control.address
        prefill.node._out.send(
            control, Status(42, prefill.node.key, False, "failed on another rank", root=False)
        )
        run_until("42 aborted", lambda: 42 in decode.aborted, decode, prefill)
        assert decode.aborted[42] == "failed on another rank"

        # A decode root cause reaches the prefill with its origin.
        add_room(decode, prefill, 43, PAGES + 1)  # oversized: decode's own cause
        run_until("prefill told", lambda: 43 in prefill.aborted, decode, prefill, timeout=10)
        assert prefill.aborted[43].startswith(f"decode aborted: decode {decode.node.key}: ")
    finally:
        decode.close()
        prefill.close()


def test_engine_side_abort_reaches_the_prefill_and_prefill_sees_the_requested_pages() -> None:
    config = TransferConfig(transport="fake", heartbeat_interval=0.2, waiting_timeout=30.0)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        add_room(decode, prefill, 51, PAGES // 2)
        run_until("51 ready", lambda: 51 in prefill.ready, decode, prefill)
        assert prefill.node.requested_pages(51) == PAGES // 2
        decode.node.abort(51, "client disconnected")
        run_until("prefill told", lambda: 51 in prefill.aborted, decode, prefill)
        assert prefill.aborted[51].endswith("client disconnected")
        assert decode.aborted[51] == "client disconnected"
        run_until("released", lambda: 51 in decode.released, decode, prefill)
        # And from the prefill's side.
        add_room(decode, prefill, 52, PAGES)
        run_until("52 ready", lambda: 52 in prefill.ready, decode, prefill)
        prefill.node.abort(52, "request cancelled in the engine")
        run_until("decode told", lambda: 52 in decode.aborted, decode, prefill)
        assert decode.aborted[52].endswith("request cancelled in the engine")
        run_until("memory back", lambda: decode.pool.num_free == PAGES, decode, prefill)
    finally:
        decode.close()
        prefill.close()


def test_a_prefill_that_has_not_added_the_room_yet_still_heartbeats_to_its_decode() -> None:
    """Decode's metadata can arrive long before the prefill engine adds the room (a router
    dispatching to both at once, a long forward pass): that is not a dead prefill."""
    config = TransferConfig(
        transport="fake", heartbeat_interval=0.1, heartbeat_max_misses=2, waiting_timeout=30.0
    )
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _commit(decode, prefill, 61, PAGES, 0x61)  # decode knows this prefill's ranks
        decode.pool.free(decode.committed[61].pages)
        decode.add(62, PAGES, prefill)  # the prefill engine has not got to room 62 yet
        run_for(1.0, decode, prefill)  # five liveness windows
        assert 62 not in decode.aborted, decode.aborted.get(62)
        prefill.node.add([PrefillRequest(62)])
        run_until("62 ready", lambda: 62 in prefill.ready, decode, prefill)
        prefill.send(62, fill=0x62)
        run_until("62 committed", lambda: 62 in decode.committed, decode, prefill)
    finally:
        decode.close()
        prefill.close()
