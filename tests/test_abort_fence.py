"""The abort fence (rule 8) with real transports: a prefill's late write for an aborted room
never lands in memory that another request was given.

The scenario a user met: decode times a room out while its prefill is still in its forward
pass; the prefill learns of the abort only at its next step, after it has already sent the
room's KV. Without the fence the aborted room's pages go straight to the next request, which
commits, and then the late write overwrites it (Mooncake and NIXL cannot refuse it).
"""

from __future__ import annotations

import numpy as np
import pytest
from integrity_rig import Decode, Prefill, add_room, run_for, run_until

from kvbridge import TransferConfig
from kvbridge.testing.rig import require_transport

pytestmark = pytest.mark.multiprocess

PAGES = 24  # the decode pool holds exactly one request


def _config(transport: str) -> TransferConfig:
    return TransferConfig(
        transport=transport,
        waiting_timeout=1.0,
        bootstrap_timeout=30.0,
        # The stalled prefill must not be declared dead during its "forward pass": here the
        # fence has to lift through the acknowledgement, not through liveness.
        heartbeat_interval=30.0,
        fence_timeout=30.0,
    )


@pytest.mark.parametrize("transport", ["fake", "mooncake", "nixl"])
def test_late_write_of_an_aborted_room_never_reaches_the_next_request(transport: str) -> None:
    require_transport(transport)
    config = _config(transport)
    slow, healthy = Prefill(config, PAGES), Prefill(config, PAGES)
    decode = Decode(config, PAGES)
    try:
        add_room(decode, slow, 101, PAGES)
        run_until("decode sent room 101's metadata", lambda: 101 in slow.ready, decode, slow)
        # The slow prefill is now in its forward pass: it does not step. Decode gives up.
        run_until("decode timed out room 101", lambda: 101 in decode.aborted, decode)
        assert "waiting_timeout" in decode.aborted[101]
        assert decode.node.session.fenced_pages == PAGES

        # The next request wants the same memory; the fence keeps it waiting.
        add_room(decode, healthy, 202, PAGES)
        run_for(1.5, decode, healthy)
        assert 202 not in decode.committed and 202 not in healthy.ready
        assert decode.pool.num_free == 0

        # The forward pass ends; the prefill sends before its next step tells it of the abort.
        slow.send(101, fill=0xAA)
        run_until(
            "the slow prefill acknowledged the abort",
            lambda: 101 in decode.released,
            decode,
            slow,
            healthy,
        )
        assert slow.node.session.draining == 0
        run_until("room 202 is ready on its prefill", lambda: 202 in healthy.ready, decode, healthy)
        healthy.send(202, fill=0x55)
        run_until("room 202 committed", lambda: 202 in decode.committed, decode, healthy)
        # Let anything still in flight land, then check the committed request's bytes.
        run_for(0.5, decode, slow, healthy)
        assert decode.pages_hold(202, 0x55), "a late write overwrote a committed request"
        decode.pool.free(decode.committed[202].pages)
        assert decode.pool.num_free == PAGES
        assert decode.node.session.fenced_pages == 0
    finally:
        for side in (decode, slow, healthy):
            side.close()


def test_dead_writer_lifts_the_fence_through_liveness() -> None:
    config = TransferConfig(
        transport="fake",
        waiting_timeout=0.5,
        heartbeat_interval=0.2,
        heartbeat_max_misses=2,
        fence_timeout=30.0,
    )
    gone = Prefill(config, PAGES)
    decode = Decode(config, PAGES)
    try:
        add_room(decode, gone, 7, PAGES)
        run_until("metadata sent", lambda: 7 in gone.ready, decode, gone)
        gone.close()  # the prefill process is gone: no acknowledgement will ever come
        run_until("room 7 released", lambda: 7 in decode.released, decode, timeout=10)
        assert decode.aborted[7].startswith("lost connection to prefill")
        assert decode.pool.num_free == PAGES
    finally:
        decode.close()
        gone.server.stop()


def test_fence_outliving_its_timeout_is_counted_and_memory_stays_held() -> None:
    config = TransferConfig(
        transport="fake", waiting_timeout=0.3, heartbeat_interval=30.0, fence_timeout=0.3
    )
    stuck, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        add_room(decode, stuck, 9, PAGES)
        run_until("metadata sent", lambda: 9 in stuck.ready, decode, stuck)
        run_until("room 9 aborted", lambda: 9 in decode.aborted, decode)
        run_until(
            "the overdue fence is counted", lambda: decode.node.session.fence_overdue == 1, decode
        )
        assert decode.pool.num_free == 0  # still quarantined, never reused on a guess
        assert 9 not in decode.released
        run_until("released after the ack", lambda: 9 in decode.released, decode, stuck)
        assert decode.pool.num_free == PAGES
    finally:
        decode.close()
        stuck.close()


def test_prefill_acknowledges_only_after_its_transport_drained() -> None:
    """The prefill half: no AbortAck while a write of the room is still in flight."""
    config = _config("fake")
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    gate = prefill.hold_writes()
    try:
        add_room(decode, prefill, 5, PAGES)
        run_until("ready", lambda: 5 in prefill.ready, decode, prefill)
        prefill.send(5, fill=0x11)  # the write starts and hangs in the transport
        run_until("decode aborted", lambda: 5 in decode.aborted, decode)
        run_until("prefill aborted", lambda: 5 in prefill.aborted, decode, prefill)
        run_for(0.5, decode, prefill)
        assert prefill.node.session.draining == 1
        assert decode.node.abort_acks == 0 and 5 not in decode.released
        gate.set()
        run_until("released", lambda: 5 in decode.released, decode, prefill)
        assert decode.node.abort_acks == 1
        assert np.all(decode.pool.num_free == PAGES)
    finally:
        gate.set()
        decode.close()
        prefill.close()


@pytest.mark.parametrize("transport", ["mooncake", "nixl"])
def test_one_sided_writer_declared_dead_keeps_the_fence_until_it_is_replaced(
    transport: str,
) -> None:
    """A silent writer may only be partitioned: its write could still land. The fence holds
    until the rank re-registers from a new process (or acknowledges)."""
    require_transport(transport)
    config = TransferConfig(
        transport=transport,
        waiting_timeout=30.0,
        heartbeat_interval=0.2,
        heartbeat_max_misses=2,
        fence_timeout=30.0,
    )
    gone = Prefill(config, PAGES)
    decode = Decode(config, PAGES)
    successor = None
    try:
        add_room(decode, gone, 8, PAGES)
        run_until("metadata sent", lambda: 8 in gone.ready, decode, gone)
        gone.node.close()  # silent from now on; its bootstrap server stays up
        run_until("room 8 failed", lambda: 8 in decode.aborted, decode, timeout=10)
        assert decode.aborted[8].startswith("lost connection to prefill")
        run_for(1.0, decode)
        assert 8 not in decode.released and decode.pool.num_free == 0
        # A new prefill process takes over the same rank of the same instance.
        successor = Prefill(config, PAGES, server=gone.server)
        run_until("room 8 released", lambda: 8 in decode.released, decode, successor, timeout=15)
        assert decode.pool.num_free == PAGES
    finally:
        decode.close()
        if successor is not None:
            successor.close()
        gone.server.stop()


@pytest.mark.parametrize("transport", ["mooncake", "nixl"])
def test_fence_lifts_when_the_whole_instance_restarts_with_no_new_request(
    transport: str,
) -> None:
    """The prefill instance dies with its bootstrap server (a killed vLLM prefill); decode's
    look-ups of the address fail until it is refused. Nothing else asks for that address,
    yet the fenced room is released once a new instance serves at the same address."""
    from kvbridge.bootstrap.server import BootstrapServer

    require_transport(transport)
    config = TransferConfig(
        transport=transport,
        waiting_timeout=30.0,
        heartbeat_interval=0.2,
        heartbeat_max_misses=2,
        fence_timeout=30.0,
        bootstrap_timeout=1.0,
        bootstrap_retry_after=0.5,
    )
    gone = Prefill(config, PAGES)
    port = int(gone.addr.rsplit(":", 1)[1])
    decode = Decode(config, PAGES)
    successor = server = None
    try:
        add_room(decode, gone, 12, PAGES)
        run_until("metadata sent", lambda: 12 in gone.ready, decode, gone)
        gone.close()  # rank and bootstrap server gone
        run_until("room 12 failed", lambda: 12 in decode.aborted, decode, timeout=10)
        run_for(2.5, decode)  # look-ups fail past bootstrap_timeout: the address is refused
        assert 12 not in decode.released and decode.pool.num_free == 0
        server = BootstrapServer("127.0.0.1", port, token=config.bootstrap_token).start()
        successor = Prefill(config, PAGES, server=server)
        run_until("room 12 released", lambda: 12 in decode.released, decode, successor, timeout=15)
        assert decode.pool.num_free == PAGES
    finally:
        decode.close()
        if successor is not None:
            successor.close()
        if server is not None:
            server.stop()


def test_an_abort_for_a_room_still_draining_is_acknowledged_only_after_the_drain() -> None:
    """Prefill gave up first (its own timeout) while a write hung; decode's abort then arrives
    for a room prefill no longer queues: the answer must still wait for the drain."""
    prefill_config = TransferConfig(transport="fake", waiting_timeout=0.5, heartbeat_interval=30)
    decode_config = TransferConfig(transport="fake", waiting_timeout=30, heartbeat_interval=30)
    prefill, decode = Prefill(prefill_config, PAGES), Decode(decode_config, PAGES)
    gate = prefill.hold_writes()
    try:
        add_room(decode, prefill, 6, PAGES)
        run_until("ready", lambda: 6 in prefill.ready, decode, prefill)
        prefill.send(6, fill=0x66)  # hangs in the transport
        run_until("prefill timed out", lambda: 6 in prefill.aborted, decode, prefill)
        run_until("decode told", lambda: 6 in decode.aborted, decode, prefill)
        run_for(0.5, decode, prefill)  # decode's abort reaches the draining prefill
        assert 6 not in decode.released and decode.node.abort_acks == 0
        gate.set()
        run_until("released", lambda: 6 in decode.released, decode, prefill)
        assert decode.pool.num_free == PAGES
    finally:
        gate.set()
        decode.close()
        prefill.close()


def test_engine_owned_pages_are_written_never_freed_and_released_after_the_fence() -> None:
    """An engine with its own allocator (vLLM, SGLang) hands kvbridge the pages per request."""
    from kvbridge.protocol.decode import DecodeRequest
    from kvbridge.protocol.prefill import PrefillRequest

    config = _config("mooncake")
    require_transport("mooncake")
    slow = Prefill(config, PAGES)
    decode = Decode(config, PAGES, engine_pages=True)  # no kvbridge allocator at all
    try:
        mine = np.arange(PAGES)[::-1].copy()  # the engine's choice of pages
        decode.node.add([DecodeRequest(301, PAGES, slow.addr, pages=mine)])
        slow.node.add([PrefillRequest(301)])
        run_until("metadata sent", lambda: 301 in slow.ready, decode, slow)
        run_until("timed out", lambda: 301 in decode.aborted, decode)
        run_for(0.5, decode)
        assert 301 not in decode.released  # the prefill may still write the engine's pages
        slow.send(301, fill=0xEE)
        run_until("released", lambda: 301 in decode.released, decode, slow)
        # Committed: the engine's own pages come back as the request's pages.
        decode.node.add([DecodeRequest(302, PAGES, slow.addr, pages=mine)])
        slow.node.add([PrefillRequest(302)])
        run_until("302 ready", lambda: 302 in slow.ready, decode, slow)
        slow.send(302, fill=0x3A)
        run_until("302 committed", lambda: 302 in decode.committed, decode, slow)
        assert np.array_equal(decode.committed[302].pages, mine)
        assert decode.pages_hold(302, 0x3A)
        assert decode.pool.num_free == PAGES  # kvbridge's own pool was never touched
    finally:
        decode.close()
        slow.close()


@pytest.mark.parametrize("transport", ["mooncake", "nixl"])
def test_a_dead_prefill_does_not_take_the_decode_instance_out_of_service(transport: str) -> None:
    """Rooms resolved to a prefill that liveness declared dead, still waiting for decode
    memory, fail at once instead of holding the head of the line for ever; a request for
    another prefill instance is served while the dead writer's in-flight room stays fenced
    (a fenced room once kept every other room of the queue from committing, too)."""
    require_transport(transport)
    config = TransferConfig(
        transport=transport,
        waiting_timeout=30.0,
        heartbeat_interval=0.2,
        heartbeat_max_misses=2,
        fence_timeout=30.0,
    )
    gone = Prefill(config, PAGES)
    other = Prefill(config, PAGES)
    decode = Decode(config, 2 * PAGES)
    try:
        add_room(decode, gone, 8, PAGES)
        run_until("metadata sent", lambda: 8 in gone.ready, decode, gone)
        # Resolved to the same prefill; does not fit while room 8 holds its pages.
        add_room(decode, gone, 9, PAGES + 1)
        run_for(0.3, decode, gone)
        assert 9 not in gone.ready
        gone.node.close()  # silent from now on
        add_room(decode, other, 10, PAGES)
        run_until("room 8 failed", lambda: 8 in decode.aborted, decode, other, timeout=10)
        run_until("room 9 failed", lambda: 9 in decode.aborted, decode, other, timeout=10)
        assert decode.aborted[9].startswith("lost connection to prefill")
        assert 9 in decode.released  # no metadata went out: nothing can write its memory
        run_until("room 10 ready", lambda: 10 in other.ready, decode, other, timeout=10)
        other.send(10, fill=7)
        run_until("room 10 committed", lambda: 10 in decode.committed, decode, other, timeout=10)
        assert decode.pages_hold(10, 7)
        assert 8 not in decode.released  # the one-sided writer's room stays fenced
    finally:
        decode.close()
        other.close()
        gone.server.stop()
