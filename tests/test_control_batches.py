"""Binary batches of control messages: one frame per peer per step, every byte still untrusted.

A rank puts what a step sends into an :class:`~kvbridge.runtime.control.Outbox`; per peer each
run of ``Metadata``, ``Status`` or ``AbortAck`` becomes one frame, in order. The batch codec
must round-trip exactly, and a hostile batch must never raise anything but MalformedFrame.
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from integrity_rig import Decode, Prefill, run_until

from kvbridge import DecodeRequest, PrefillRequest, TransferConfig
from kvbridge.protocol.messages import (
    MAGIC,
    VERSION,
    Abort,
    AbortAck,
    MalformedFrame,
    Message,
    Metadata,
    Register,
    Status,
    decode,
    decode_all,
    encode_batch,
)
from kvbridge.runtime.control import Outbox

KEY = "127.0.0.1:8998/dp0/tp1"
keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
rooms = st.integers(1, 2**64 - 1)


def _meta_key(m: Metadata) -> tuple[object, ...]:
    return (m.room, m.decode_key, m.pages.tolist(), m.aux_slot, m.expected, m.route)


@given(
    keys,
    st.lists(
        st.tuples(
            rooms,
            st.lists(st.integers(0, 2**62), max_size=20),
            st.integers(0, 2**31),
            st.integers(1, 4096),
            st.none() | st.tuples(*[st.integers(0, 2**40)] * 3),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_metadata_batches_round_trip(key: str, items: list[tuple]) -> None:
    sent = [
        Metadata(r, key, np.array(p, dtype=np.int64), s, e, route) for r, p, s, e, route in items
    ]
    back = decode_all(encode_batch(sent))
    assert [_meta_key(m) for m in back] == [_meta_key(m) for m in sent]  # type: ignore[arg-type]


@given(
    keys,
    st.lists(
        st.tuples(
            rooms,
            st.booleans(),
            st.none()
            | st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30),
            st.none() | st.integers(0, 2**32 - 1),
            st.booleans(),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_status_and_ack_batches_round_trip(key: str, items: list[tuple]) -> None:
    sent = [Status(r, key, ok, reason, crc, root) for r, ok, reason, crc, root in items]
    assert decode_all(encode_batch(sent)) == sent
    acks = [AbortAck(r, key) for r, *_ in items]
    assert decode_all(encode_batch(acks)) == acks


def test_a_batch_carries_one_kind_from_one_sender() -> None:
    with pytest.raises(ValueError):
        encode_batch([Status(1, KEY, True), AbortAck(2, KEY)])
    with pytest.raises(ValueError):
        encode_batch([Status(1, KEY, True), Status(2, "another", True)])
    with pytest.raises(MalformedFrame, match="carries 2 messages"):
        decode(encode_batch([Status(1, KEY, True), Status(2, KEY, True)]))


def test_an_overlong_reason_does_not_spoil_the_batch() -> None:
    back = decode_all(encode_batch([Status(1, KEY, False, "x" * 1_000_000), Status(2, KEY, True)]))
    assert [s.room for s in back] == [1, 2]  # type: ignore[union-attr]
    assert back[0].reason is not None and len(back[0].reason) <= 1024  # type: ignore[union-attr]


def _body(kind: int, key: bytes, count: int, tail: bytes) -> list[bytes]:
    return [
        MAGIC + bytes([VERSION, kind]),
        struct.pack("<H", len(key)) + key + struct.pack("<I", count) + tail,
    ]


_META = struct.Struct("<QIHBQQQI")


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (_body(9, b"p", 0, b""), "batch of 0"),
        (_body(9, b"\xff\xfe", 1, b""), "not UTF-8"),
        (_body(9, b"p", 2, struct.pack("<QBII", 1, 1, 0, 0xFFFFFFFF)), "truncated"),
        (_body(9, b"p", 1, struct.pack("<QBII", 0, 1, 0, 0xFFFFFFFF)), "out of range"),
        (_body(9, b"p", 1, struct.pack("<QBII", 1, 64, 0, 0xFFFFFFFF)), "out of range"),
        (_body(9, b"p", 1, struct.pack("<QBII", 1, 0, 0, 5) + b"ab"), "truncated"),
        (_body(9, b"p", 1, struct.pack("<QBII", 1, 0, 0, 2) + b"\xff\xff"), "not UTF-8"),
        (_body(9, b"p", 1, struct.pack("<QBII", 1, 1, 0, 0xFFFFFFFF) + b"x"), "after the last"),
        (_body(10, b"p", 1, struct.pack("<Q", 0)), "room"),
        (_body(10, b"p", 1, struct.pack("<QQ", 1, 2)), "after the last"),
        (_body(8, b"p", 1, _META.pack(1, 0, 1, 0, 0, 0, 0, 2) + b"\x00" * 8), "page counts"),
        (_body(8, b"p", 1, _META.pack(1, 0, 1, 0, 0, 0, 0, 1) + struct.pack("<q", -1)), "negative"),
        (_body(8, b"p", 1, _META.pack(1, 0, 0, 0, 0, 0, 0, 0)), "out of range"),
        (_body(8, b"p", 1, _META.pack(1, 2**31 + 1, 1, 0, 0, 0, 0, 0)), "out of range"),
        (_body(8, b"p", 1, _META.pack(1, 0, 1, 2, 0, 0, 0, 0)), "out of range"),
        (_body(8, b"p" * 2000, 1, b""), "key"),
        ([b"KVB\x02\x09", b""], "version 2"),
    ],
)
def test_malformed_batches_are_refused_whole_with_a_reason(
    frames: list[bytes], reason: str
) -> None:
    with pytest.raises(MalformedFrame, match=reason):
        decode_all(frames)


@given(st.sampled_from([8, 9, 10]), st.binary(max_size=200))
def test_garbage_batches_never_raise_anything_but_malformed_frame(kind: int, body: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_all([MAGIC + bytes([VERSION, kind]), body])


class _Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[str, list[bytes]]] = []

    def send(self, address: str, message: Message) -> bool:
        from kvbridge.protocol.messages import encode

        return self.send_frames(address, encode(message))

    def send_frames(self, address: str, parts: list[bytes]) -> bool:
        self.frames.append((address, parts))
        return True


def test_the_outbox_keeps_each_peers_order_and_batches_each_run() -> None:
    sender = _Recorder()
    outbox = Outbox(sender)  # type: ignore[arg-type]
    register = Register("dec", {"id": "x"}, (), ((1, 24, 24, "cpu"),), "tcp://h:1")
    meta = [Metadata(r, "dec", np.arange(r), 0, 1, None) for r in (1, 2, 3, 4)]
    abort = Abort(9, "dec", "gone")
    for message in (register, meta[0], meta[1], abort, meta[2]):
        outbox.put("tcp://a:1", message)
    outbox.put("tcp://b:1", meta[3])
    assert sender.frames == []  # nothing leaves before the flush
    outbox.flush()
    by_peer: dict[str, list[list[Message]]] = {}
    for address, parts in sender.frames:
        by_peer.setdefault(address, []).append(decode_all(parts))
    a = by_peer["tcp://a:1"]
    assert [[type(m).__name__ for m in frame] for frame in a] == [
        ["Register"],
        ["Metadata", "Metadata"],
        ["Abort"],
        ["Metadata"],
    ]
    assert [m.room for m in a[1] + a[3]] == [1, 2, 3]  # type: ignore[union-attr]
    assert [m.room for frame in by_peer["tcp://b:1"] for m in frame] == [4]  # type: ignore[union-attr]
    outbox.flush()
    assert len(sender.frames) == 5  # a second flush sends nothing


def test_a_step_sends_one_frame_per_peer_for_all_its_rooms() -> None:
    config = TransferConfig(transport="fake", waiting_timeout=30.0, heartbeat_interval=60.0)
    prefill, decode_rank = Prefill(config, 16), Decode(config, 16)
    try:
        # The first room makes decode fetch the prefill's info and register with it.
        prefill.node.add([PrefillRequest(70)])
        decode_rank.add(70, 4, prefill)
        run_until("first ready", lambda: 70 in prefill.ready, decode_rank, prefill)
        rooms = [71, 72, 73, 74]
        prefill.node.add([PrefillRequest(r) for r in rooms])
        decode_rank.node.add([DecodeRequest(r, 3, prefill.addr) for r in rooms])
        frames, received = prefill.node.control.frames, prefill.node.control.received
        decode_rank.step()  # resolves and allocates all four: their metadata in one frame
        run_until("all ready", lambda: set(rooms) <= prefill.ready, prefill)
        assert prefill.node.control.frames - frames == 1
        assert prefill.node.control.received - received == 4
        for slot, room in enumerate(rooms):
            prefill.buffers.write_aux(slot, room)
            prefill.node.send(room, np.arange(3), is_last=True, aux_slot=slot)
        statuses = prefill.node.manager.sender_poll  # the transport's view, no step taken
        run_until("all written", lambda: statuses(np.array(rooms, np.uint64))[0].min() == 4)
        control = decode_rank.node.control
        frames, received = control.frames, control.received
        prefill.step()  # sees all four written: their completions in one frame
        run_until("completions", lambda: control.received - received >= 4)
        assert control.frames - frames == 1
    finally:
        decode_rank.close()
        prefill.close()
