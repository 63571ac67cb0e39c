"""A prefill instance killed and restarted at the same address serves new requests, with every
transport; its rooms in flight fail with the real cause, and nothing stays held or open."""

from __future__ import annotations

import socket

import pytest
from integrity_rig import Decode, Prefill, add_room, run_for, run_until

from kvbridge import TransferConfig
from kvbridge.bootstrap.server import BootstrapServer
from kvbridge.testing.rig import require_transport

pytestmark = pytest.mark.multiprocess
PAGES = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _commit(decode: Decode, prefill: Prefill, room: int, fill: int) -> None:
    add_room(decode, prefill, room, PAGES)
    run_until(f"{room} ready", lambda: room in prefill.ready, decode, prefill)
    prefill.send(room, fill=fill)
    run_until(
        f"{room} ended", lambda: room in decode.committed or room in decode.aborted, decode, prefill
    )
    assert room in decode.committed, decode.aborted.get(room)
    assert decode.pages_hold(room, fill)
    decode.pool.free(decode.committed[room].pages)


@pytest.mark.parametrize("transport", ["fake", "mooncake", "nixl"])
def test_prefill_restarted_at_the_same_address_serves_new_requests(transport: str) -> None:
    require_transport(transport)
    config = TransferConfig(
        transport=transport,
        waiting_timeout=30.0,
        bootstrap_timeout=20.0,
        heartbeat_interval=0.2,
        heartbeat_max_misses=3,
        bootstrap_retry_after=0.5,
        fence_timeout=30.0,
    )
    port = _free_port()
    server = BootstrapServer("127.0.0.1", port).start()
    first = Prefill(config, PAGES, server=server)
    decode = Decode(config, PAGES)
    second = None
    try:
        _commit(decode, first, 1, 0x01)
        add_room(decode, first, 2, PAGES)
        run_until("2 ready", lambda: 2 in first.ready, decode, first)
        first.node.close()  # the whole prefill instance goes away, its bootstrap server too
        server.stop()
        run_until("2 failed", lambda: 2 in decode.aborted, decode, timeout=10)
        assert decode.aborted[2].startswith("lost connection to prefill 127.0.0.1:"), decode.aborted

        server = BootstrapServer("127.0.0.1", port).start()  # restarted at the same address
        second = Prefill(config, PAGES, server=server)
        assert second.addr == first.addr
        for room, fill in ((3, 0x03), (4, 0x04), (5, 0x05)):
            _commit(decode, second, room, fill)
        # Room 2's memory came back: through the heartbeat (Fake) or, where writes are
        # one-sided, once the rank re-registered from the new process.
        run_until("2 released", lambda: decode.pool.num_free == PAGES, decode, second, timeout=10)
        assert decode.node.session.fenced_pages == 0 and len(decode.node.session) == 0
    finally:
        decode.close()
        if second is not None:
            second.node.close()
        server.stop()


def test_sockets_to_a_prefill_nobody_uses_any_more_are_closed() -> None:
    config = TransferConfig(
        transport="fake", bootstrap_timeout=0.5, heartbeat_interval=0.1, waiting_timeout=30.0
    )
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _commit(decode, prefill, 7, 0x07)
        control = prefill.node.control.address
        assert control in decode.node._out._sockets
        run_until(
            "the idle socket closed",
            lambda: control not in decode.node._out._sockets,
            decode,
            prefill,
            timeout=10,
        )
        _commit(decode, prefill, 8, 0x08)  # and it comes back when needed, registering again
    finally:
        decode.close()
        prefill.close()


def test_a_dead_bootstrap_server_alone_fails_nothing_in_flight() -> None:
    config = TransferConfig(
        transport="fake", waiting_timeout=30.0, heartbeat_interval=0.1, heartbeat_max_misses=2
    )
    server = BootstrapServer("127.0.0.1", _free_port()).start()
    prefill = Prefill(config, PAGES, server=server)
    decode = Decode(config, 4 * PAGES)
    try:
        rooms = [11, 12, 13]
        for room in rooms:
            add_room(decode, prefill, room, PAGES)
        run_until("all ready", lambda: set(rooms) <= prefill.ready, decode, prefill)
        server.stop()  # the standalone bootstrap server dies; the prefill ranks live on
        run_for(1.0, decode, prefill)  # many heartbeat intervals without bootstrap
        for room in rooms:
            prefill.send(room, fill=room)
            run_until(f"{room} committed", lambda r=room: r in decode.committed, decode, prefill)
            assert decode.pages_hold(room, room)
        assert not decode.aborted
    finally:
        decode.close()
        prefill.node.close()
