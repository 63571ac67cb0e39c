"""Rule 9 with real sockets: only the room's writers count, hostile frames stop nothing, and
with a shared secret no unauthenticated frame is acted on. Also the end-to-end checksum mode."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from integrity_rig import Decode, Prefill, add_room, run_for, run_until

from kvbridge import TransferConfig
from kvbridge.protocol.messages import Abort, Metadata, Register, Status, encode
from kvbridge.secret import Secret

pytestmark = pytest.mark.multiprocess
PAGES = 16
SECRET = Secret("correct horse battery staple, twice over")


def _config(**kw: object) -> TransferConfig:
    base = {"transport": "fake", "waiting_timeout": 20.0, "heartbeat_interval": 30.0}
    base.update(kw)
    return TransferConfig(**base)  # type: ignore[arg-type]


_HOSTILE_PROCESS = """
import base64, json, sys, time
import zmq
context = zmq.Context()
sockets = {}
for address, frame in json.load(sys.stdin):
    sock = sockets.get(address)
    if sock is None:
        sock = sockets[address] = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(address)
    sock.send_multipart([base64.b64decode(part) for part in frame])
for sock in sockets.values():
    sock.close()
context.term()
"""


class Hostile:
    """Another local process that found the control sockets: raw ZMQ, no kvbridge sender."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, list[str]]] = []

    def send(self, address: str, frames: list[bytes]) -> None:
        self.queued.append((address, [base64.b64encode(f).decode() for f in frames]))

    def flush(self) -> None:
        subprocess.run(
            [sys.executable, "-c", _HOSTILE_PROCESS],
            input=json.dumps(self.queued),
            text=True,
            check=True,
            timeout=60,
        )
        self.queued.clear()

    def close(self) -> None:
        self.queued.clear()


def _honest_round(decode: Decode, prefill: Prefill, room: int, fill: int) -> None:
    add_room(decode, prefill, room, PAGES)
    run_until(f"room {room} ready", lambda: room in prefill.ready, decode, prefill)
    prefill.send(room, fill=fill)
    run_until(
        f"room {room} committed",
        lambda: room in decode.committed or room in decode.aborted,
        decode,
        prefill,
    )
    assert room in decode.committed, decode.aborted.get(room)
    assert decode.pages_hold(room, fill)
    decode.pool.free(decode.committed[room].pages)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _hostile_frames(decode: Decode, prefill: Prefill, room: int) -> dict[str, list[list[bytes]]]:
    """Every attack the issue lists, addressed to the rank it targets."""
    decode_key = decode.node.key
    prefill_key = prefill.node.key
    wire = tuple((r.addr, r.length, r.item_bytes) for r in decode.buffers.kv_regions)
    return {
        decode.node.control.address: [
            # a completion from a stranger, and one failing the room
            encode(Status(room, "10.0.0.9:1/dp0/tp0", True)),
            encode(Status(room, "10.0.0.9:1/dp0/tp0", False, "\x1b[31mboom\x1b[0m")),
            # a deeply nested header (RecursionError in json), garbage, a huge header
            [b"KVB\x03\x04", _nested(100_000)],
            [b"garbage"],
            [b"KVB\x03\x04", b"{" + b" " * (1 << 20) + b"}"],
        ],
        prefill.node.control.address: [
            [b"KVB\x03\x03", _nested(100_000)],
            # abort any room, as a stranger
            encode(Abort(room, "decode-stranger-dp0-tp0", "\x1b[2Jgo away")),
            # re-register the real decode rank with other memory, then point the room there
            encode(
                Register(
                    decode_key,
                    {"host": "127.0.0.1", "port": 1},
                    tuple((a + 4096, n, i) for a, n, i in wire),
                    wire[:1],
                    "tcp://127.0.0.1:1",
                )
            ),
            # a registration whose control address is no endpoint
            [
                b"KVB\x03\x01",
                json.dumps(
                    {
                        "decode_key": "evil",
                        "endpoint": {},
                        "kv_regions": [],
                        "aux_regions": [],
                        "control": "ipc:///tmp/x",
                    }
                ).encode(),
            ],
            # metadata from an unregistered decode rank, and a status on the wrong side
            encode(Metadata(room, "decode-stranger", np.arange(4), 0, 1, (0, 0, 4096))),
            encode(Status(room, prefill_key, True)),
        ],
    }


def test_hostile_frames_without_a_secret_stop_nothing_and_count_nothing_as_honest() -> None:
    config = _config()
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    hostile = Hostile()
    try:
        room = 41
        add_room(decode, prefill, room, PAGES)
        run_until("room ready", lambda: room in prefill.ready, decode, prefill)
        for address, frames in _hostile_frames(decode, prefill, room).items():
            for frame in frames:
                hostile.send(address, frame)
        hostile.flush()
        run_for(0.5, decode, prefill)
        prefill.send(room, fill=0x3C)
        run_until("committed", lambda: room in decode.committed, decode, prefill)
        assert decode.pages_hold(room, 0x3C)
        decode.pool.free(decode.committed[room].pages)
        # every frame was dropped, counted, and the receive threads are alive
        d, p = decode.node, prefill.node
        assert d.control.dropped == 3 and d.session.untrusted == 2
        assert p.control.dropped == 2  # nested header, bad control address
        assert p.session.untrusted == 4  # stranger abort, re-register, metadata, wrong side
        _honest_round(decode, prefill, 42, 0x5A)
    finally:
        hostile.close()
        decode.close()
        prefill.close()


def test_with_a_secret_even_well_formed_spoofed_frames_are_rejected() -> None:
    config = _config(secret=SECRET)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    hostile = Hostile()
    try:
        room = 51
        add_room(decode, prefill, room, PAGES)
        run_until("room ready", lambda: room in prefill.ready, decode, prefill)
        # A spoofed completion that names the real writer would pass the trust check: only
        # the MAC stops it.
        hostile.send(decode.node.control.address, encode(Status(room, prefill.node.key, True)))
        hostile.send(
            prefill.node.control.address, encode(Abort(room, decode.node.key, "spoofed abort"))
        )
        sent = 2
        for address, frames in _hostile_frames(decode, prefill, room).items():
            for frame in frames:
                hostile.send(address, frame)
                sent += 1
        hostile.flush()
        run_for(0.5, decode, prefill)
        rejected = decode.node.control.rejected + prefill.node.control.rejected
        assert rejected == sent
        assert decode.node.session.untrusted == prefill.node.session.untrusted == 0
        prefill.send(room, fill=0x77)
        run_until("committed", lambda: room in decode.committed, decode, prefill)
        assert decode.pages_hold(room, 0x77)
        decode.pool.free(decode.committed[room].pages)
    finally:
        hostile.close()
        decode.close()
        prefill.close()


def test_metadata_out_of_range_fails_that_room_with_a_reason_and_nothing_else() -> None:
    config = _config()
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _honest_round(decode, prefill, 61, 0x11)  # registers the decode rank
        from kvbridge.protocol.prefill import PrefillRequest

        prefill.node.add([PrefillRequest(62)])
        decode.node._out.send(
            prefill.node.control.address,
            Metadata(62, decode.node.key, np.array([0, 10**9]), 0, 1, (0, 0, 4096)),
        )
        run_until("room 62 failed", lambda: 62 in prefill.aborted, prefill)
        assert "page 1000000000 is out of range" in prefill.aborted[62]
        _honest_round(decode, prefill, 63, 0x22)
    finally:
        decode.close()
        prefill.close()


def test_checksum_mode_commits_honest_rooms_and_fails_a_corrupted_one(tmp_path: Path) -> None:
    config = _config(verify_checksums=True)
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _honest_round(decode, prefill, 71, 0x42)
        add_room(decode, prefill, 72, PAGES)
        run_until("ready", lambda: 72 in prefill.ready, decode, prefill)
        prefill.send(72, fill=0x43)
        run_until("prefill done", lambda: 72 in prefill.finished, prefill)
        # A byte goes bad on decode after it landed (a fault no transport reports).
        pages = decode.node.session.queue.allocated[72]
        decode.buffers.kv[1][pages[3], 100] ^= 0xFF
        run_until("decode decided", lambda: 72 in decode.aborted or 72 in decode.committed, decode)
        assert "checksum mismatch" in decode.aborted[72]
        run_until("released", lambda: 72 in decode.released, decode, prefill)
        assert decode.pool.num_free == PAGES
    finally:
        decode.close()
        prefill.close()


def test_decode_aux_rows_shorter_than_prefill_rows_fail_that_room_not_the_memory() -> None:
    """Prefill copies whole aux rows: a decode rank registering shorter rows (another layout,
    or a lie) would have the copy overrun into its next slot. The room fails instead."""
    config = _config()
    prefill, decode = Prefill(config, PAGES), Decode(config, PAGES)
    try:
        _honest_round(decode, prefill, 71, 0x31)
        from kvbridge.protocol.prefill import PrefillRequest

        kv = tuple((r.addr, r.length, r.item_bytes) for r in decode.buffers.kv_regions)
        aux = decode.buffers.aux_regions[0]
        short = ((aux.addr, aux.length - aux.length % 8, 8),)
        key = "decode-short-rows-dp0-tp0"
        decode.node._out.send(
            prefill.node.control.address,
            Register(
                key, dict(decode.node.manager.endpoint), kv, short, decode.node.control.address
            ),
        )
        prefill.node.add([PrefillRequest(72)])
        decode.node._out.send(
            prefill.node.control.address,
            Metadata(72, key, np.arange(2), 0, 1, (0, 0, kv[0][2])),
        )
        run_until("room 72 failed", lambda: 72 in prefill.aborted, prefill)
        assert "aux rows of [8] bytes" in prefill.aborted[72]
        _honest_round(decode, prefill, 73, 0x32)
    finally:
        decode.close()
        prefill.close()
