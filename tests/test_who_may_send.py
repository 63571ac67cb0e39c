"""Rule 9's table (``WHO_MAY_SEND``) against the real nodes: every control message has a row,
and a forged frame from a sender the row does not allow is refused and counted, with no effect
on the room it names. The frames come from a raw ZMQ socket, as a hostile local process would
send them."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq
from integrity_rig import PAGE_BYTES, Decode, Prefill, add_room, run_for, run_until

from kvbridge import TransferConfig
from kvbridge.protocol import messages
from kvbridge.protocol.messages import (
    WHO_MAY_SEND,
    Abort,
    AbortAck,
    Heartbeat,
    Message,
    Metadata,
    Register,
    Standing,
    Status,
    Waiting,
    encode,
    refused_by,
    sender_of,
)
from kvbridge.types import Role

pytestmark = pytest.mark.multiprocess
PAGES = 8


def stranger(role: Role, kind: type) -> str:
    """A key of ``role`` that nothing registered (one per test: a stranger's Register binds)."""
    if role is Role.DECODE:
        return f"decode-stranger-{kind.__name__}-dp0-tp0"
    return f"stranger-{kind.__name__}:1/dp0/tp0"


def forged(kind: type, room: int, key: str) -> Message:
    """A well-formed message of ``kind`` about ``room`` that says ``key`` sent it."""
    make: dict[type, Callable[[], Message]] = {
        Register: lambda: Register(key, {}, ((4096, 4096, 4096, "cpu"),), (), "tcp://127.0.0.1:1"),
        Metadata: lambda: Metadata(room, key, np.arange(2), 0, 1, (0, 0, PAGE_BYTES)),
        Abort: lambda: Abort(room, key, "forged abort"),
        Waiting: lambda: Waiting(key, np.array([room], dtype=np.uint64)),
        Status: lambda: Status(room, key, False, "forged failure"),
        AbortAck: lambda: AbortAck(room, key),
        Heartbeat: lambda: Heartbeat(key),
    }
    message = make[kind]()
    assert sender_of(message) == key
    return message


def test_every_message_has_a_row_and_only_one_role_sends_it() -> None:
    kinds = set(typing.get_args(Message))
    assert set(WHO_MAY_SEND) == kinds == set(messages._KINDS.values())
    for kind, row in WHO_MAY_SEND.items():
        assert row.role in (Role.DECODE, Role.PREFILL)
        assert isinstance(row.standing, Standing)
        message = forged(kind, 1, "k")
        # exactly one role receives it: the one that does not send it
        assert refused_by(row.role, message) and not refused_by(_other(row.role), message)


def _other(role: Role) -> Role:
    return Role.PREFILL if role is Role.DECODE else Role.DECODE


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Decode, Prefill]]:
    config = TransferConfig(transport="fake", waiting_timeout=30.0, heartbeat_interval=30.0)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        yield decode, prefill
    finally:
        decode.close()
        prefill.close()


@pytest.fixture(scope="module")
def forger() -> Iterator[Callable[[str, Message], None]]:
    context = zmq.Context.instance()
    sockets: dict[str, zmq.Socket] = {}

    def send(address: str, message: Message) -> None:
        sock = sockets.get(address)
        if sock is None:
            sock = sockets[address] = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
        sock.send_multipart(encode(message))

    yield send
    for sock in sockets.values():
        sock.close()


_rooms = iter(range(100, 10_000))


def _forge_into_live_room(
    pair: tuple[Decode, Prefill],
    send: Callable[[str, Message], None],
    kind: type,
    to: Role,
    key: Callable[[Decode, Prefill], str],
) -> int:
    """Send one forged ``kind`` to the ``to`` node while a room is live on both sides; return
    how many messages that node counted as untrusted; the room must still commit."""
    decode, prefill = pair
    room = next(_rooms)
    add_room(decode, prefill, room, PAGES)
    run_until(f"room {room} ready", lambda: room in prefill.ready, decode, prefill)
    node = decode.node if to is Role.DECODE else prefill.node
    before_received, before_untrusted = node.control.received, node.session.untrusted
    send(node.control.address, forged(kind, room, key(decode, prefill)))
    run_until("frame received", lambda: node.control.received > before_received, decode, prefill)
    run_for(0.2, decode, prefill)
    untrusted = node.session.untrusted - before_untrusted
    prefill.send(room, fill=room % 251)
    run_until(
        f"room {room} ended",
        lambda: room in decode.committed or room in decode.aborted,
        decode,
        prefill,
    )
    assert room in decode.committed, f"{kind.__name__}: {decode.aborted.get(room)}"
    assert decode.pages_hold(room, room % 251)
    decode.pool.free(decode.committed[room].pages)
    return untrusted


@pytest.mark.parametrize("kind", sorted(WHO_MAY_SEND, key=lambda k: k.__name__))
def test_a_message_of_the_receivers_own_role_is_refused(pair, forger, kind: type) -> None:
    """It names the real peer as its sender: only the role check can refuse it."""
    sender_role = WHO_MAY_SEND[kind].role

    def real_peer(decode: Decode, prefill: Prefill) -> str:
        return decode.node.key if sender_role is Role.DECODE else prefill.node.key

    assert _forge_into_live_room(pair, forger, kind, sender_role, real_peer) == 1


@pytest.mark.parametrize("kind", sorted(WHO_MAY_SEND, key=lambda k: k.__name__))
def test_a_message_from_a_stranger_of_the_right_role(pair, forger, kind: type) -> None:
    """A sender of the right role that the room (or this rank) does not know: refused unless
    the row says any rank of that role may send it."""
    row = WHO_MAY_SEND[kind]
    key = stranger(row.role, kind)
    untrusted = _forge_into_live_room(pair, forger, kind, _other(row.role), lambda d, p: key)
    assert untrusted == (0 if row.standing is Standing.ANY else 1)


def test_a_registered_decode_rank_may_not_speak_for_a_room_bound_to_another(pair, forger) -> None:
    """``Standing.ROOM_DECODE``: registered is not enough once the room is bound."""
    decode, prefill = pair
    other = "decode-other-dp0-tp0"
    wire = tuple((r.addr, r.length, r.item_bytes, r.device) for r in decode.buffers.kv_regions)
    aux = tuple((r.addr, r.length, r.item_bytes, r.device) for r in decode.buffers.aux_regions)
    forger(prefill.node.control.address, Register(other, {}, wire, aux, "tcp://127.0.0.1:1"))
    run_until("registered", lambda: other in prefill.node.session.rooms.decode_peers, prefill)
    for kind in (Metadata, Abort):
        assert WHO_MAY_SEND[kind].standing is Standing.ROOM_DECODE
        assert _forge_into_live_room(pair, forger, kind, Role.PREFILL, lambda d, p: other) == 1


def test_a_second_registration_with_other_memory_is_refused(pair, forger) -> None:
    """``Standing.ANY`` for ``Register``: the first registration of a key binds it."""
    decode, prefill = pair

    def moved(kind: type, room: int, key: str) -> Message:
        return Register(key, {}, ((1 << 40, 4096, 4096, "cpu"),), (), "tcp://127.0.0.1:1")

    room = next(_rooms)
    add_room(decode, prefill, room, PAGES)
    run_until("ready", lambda: room in prefill.ready, decode, prefill)
    before = prefill.node.session.untrusted
    forger(prefill.node.control.address, moved(Register, room, decode.node.key))
    run_until("refused", lambda: prefill.node.session.untrusted > before, decode, prefill)
    prefill.send(room, fill=0x5A)
    run_until("committed", lambda: room in decode.committed, decode, prefill)
    assert decode.pages_hold(room, 0x5A)
    decode.pool.free(decode.committed[room].pages)
