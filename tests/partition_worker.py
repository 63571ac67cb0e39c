"""One prefill or decode rank (TP 1) in its own process, for tests/test_network_partition.py.

    python partition_worker.py prefill|decode '<json settings>'

Settings: ``config`` (a TransferConfig dict, with the side's ``bind_host``), ``lifetime``
(seconds before the process ends on its own). Commands arrive on stdin as JSON lines:
``{"add": [rooms], "bootstrap": "host:port"}`` (``bootstrap`` on decode only),
``{"report": true}``, ``{"quit": true}``; end of stdin is a quit too. With ``hold_sends``
the prefill fills a ready room's pages but sends them only on ``{"send": [rooms]}``. Every
event goes to stdout as one JSON line with ``t`` = ``time.monotonic()`` (one clock for every
process here)."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import Any

import numpy as np

from kvbridge import PagePool, RankIdentity, Role, TransferConfig
from kvbridge.bootstrap.server import BootstrapServer
from kvbridge.memory import IndexPool
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.decode_node import DecodeNode
from kvbridge.runtime.prefill_node import PrefillNode
from kvbridge.testing.buffers import RankBuffers

PAGES = 8  # pages per request
SLOTS = 8  # requests that fit at once, on both sides
PAGE_BYTES = 4096
REGIONS = 2


def alone(local: np.ndarray, rooms: np.ndarray) -> np.ndarray:
    """The MIN over a group of one rank."""
    return local


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def read_commands(into: queue.Queue[dict[str, Any]]) -> None:
    for line in sys.stdin:
        if line.strip():
            into.put(json.loads(line))
    into.put({"quit": True})


def _transport_rooms(manager: Any) -> int:
    raw = getattr(manager, "raw", manager)
    books = [getattr(raw, name, None) for name in ("senders", "receivers")]
    return sum(len(book.rooms) for book in books if book is not None)


def run_prefill(
    config: TransferConfig,
    commands: queue.Queue[dict[str, Any]],
    end: float,
    settings: dict[str, Any],
) -> None:
    server = BootstrapServer(config.bind_host, 0, token=config.bootstrap_token).start()
    addr = f"{config.advertised_host}:{server.port}"
    buffers = RankBuffers.allocate(
        num_regions=REGIONS, num_pages=PAGES * SLOTS, page_bytes=PAGE_BYTES, num_slots=SLOTS
    )
    node = PrefillNode(
        config=config,
        rank=RankIdentity(Role.PREFILL),
        kv_regions=buffers.kv_regions,
        aux_regions=buffers.aux_regions,
        reducer=alone,
        bootstrap_addr=addr,
        page_size=16,
        kv_dtype="uint8",
    )
    slots = IndexPool(SLOTS)
    held: dict[int, int] = {}
    hold = bool(settings.get("hold_sends"))
    try:
        emit("ready", bootstrap=addr, control=node.control.address, endpoint=node.manager.endpoint)
        while time.monotonic() < end:
            try:
                command = commands.get_nowait()
            except queue.Empty:
                command = {}
            if command.get("quit"):
                break
            if "add" in command:
                node.add([PrefillRequest(int(r)) for r in command["add"]])
            for room in command.get("send", ()):
                slot = held[room]
                node.send(
                    room, np.arange(slot * PAGES, (slot + 1) * PAGES), is_last=True, aux_slot=slot
                )
                emit("sent", room=room)
            if command.get("report"):
                emit(
                    "state",
                    live=len(node.session),
                    draining=node.session.draining,
                    transport_rooms=_transport_rooms(node.manager),
                    slots_free=slots.num_free,
                )
            result = node.step()
            for room in result.ready:
                got = slots.alloc(1)
                if got is None:
                    raise RuntimeError(f"prefill has no slot for room {room}")
                slot = int(got[0])
                pages = np.arange(slot * PAGES, (slot + 1) * PAGES)
                buffers.fill(room, pages)
                buffers.write_aux(slot, room)
                held[room] = slot
                if hold:
                    emit("ready_room", room=room)
                    continue
                node.send(room, pages, is_last=True, aux_slot=slot)
                emit("sent", room=room)
            for room in result.finished:
                slots.free([held.pop(room)])
                emit("finished", room=room)
            for aborted in result.aborted:
                if aborted.room in held:
                    slots.free([held.pop(aborted.room)])
                emit("aborted", room=aborted.room, reason=aborted.reason)
            time.sleep(0.002)
    finally:
        node.close()
        server.stop()


def run_decode(
    config: TransferConfig,
    commands: queue.Queue[dict[str, Any]],
    end: float,
    settings: dict[str, Any],
) -> None:
    buffers = RankBuffers.allocate(
        num_regions=REGIONS, num_pages=PAGES * SLOTS, page_bytes=PAGE_BYTES, num_slots=SLOTS
    )
    pool = PagePool(PAGES * SLOTS)
    node = DecodeNode(
        config=config,
        rank=RankIdentity(Role.DECODE),
        kv_regions=buffers.kv_regions,
        aux=buffers.aux,
        pages=pool,
        reducer=alone,
        page_size=16,
        kv_dtype="uint8",
    )
    session = node.session
    try:
        emit("ready", control=node.control.address, endpoint=node.manager.endpoint)
        while time.monotonic() < end:
            try:
                command = commands.get_nowait()
            except queue.Empty:
                command = {}
            if command.get("quit"):
                break
            if "add" in command:
                boot = command["bootstrap"]
                node.add([DecodeRequest(int(r), PAGES, boot) for r in command["add"]])
            if command.get("report"):
                emit(
                    "state",
                    free_pages=pool.num_free,
                    total_pages=PAGES * SLOTS,
                    aux_free=session.aux_slots.num_free,
                    total_aux=SLOTS,
                    fenced_pages=session.fenced_pages,
                    live=len(session),
                    transport_rooms=_transport_rooms(node.manager),
                )
            result = node.step()
            for done in result.committed:
                bad = buffers.mismatches(done.room, done.pages)
                aux_ok = int(done.aux_row["room"]) == done.room
                pool.free(done.pages)
                emit("committed", room=done.room, bad_pages=bad[:4], aux_ok=aux_ok)
            for aborted in result.aborted:
                emit("aborted", room=aborted.room, reason=aborted.reason)
            for room in result.released:
                emit("released", room=room)
            time.sleep(0.002)
    finally:
        node.close()


def main() -> None:
    role, raw = sys.argv[1], sys.argv[2]
    settings = json.loads(raw)
    config = TransferConfig.from_dict(settings["config"])
    commands: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=read_commands, args=(commands,), daemon=True).start()
    end = time.monotonic() + float(settings.get("lifetime", 60.0))
    try:
        (run_prefill if role == "prefill" else run_decode)(config, commands, end, settings)
    except Exception as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise
    emit("exit")


if __name__ == "__main__":
    main()
