"""A receiver in another process, for conformance tests that cross a process boundary.

The child ends on its own when the parent says so or when the pipe closes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kvbridge.buffers import RankBuffers
from kvbridge.config import TransferConfig
from kvbridge.transport.facade import Transport
from kvbridge.transport.loading import TransportRegistry
from kvbridge.types import RankIdentity, Role

_IDLE_LIMIT = 120.0


def _serve(conn: Connection, name: str, options: dict[str, Any], shape: dict[str, int]) -> None:
    transport = Transport(TransportRegistry.discover().get(name))
    config = TransferConfig(transport=name, transport_options=options)
    buffers = RankBuffers.allocate(**shape)  # type: ignore[arg-type]
    manager = transport.create_manager(
        config, RankIdentity(Role.DECODE), buffers.kv_regions, buffers.aux_regions
    )
    conn.send((manager.endpoint, buffers.kv_regions, buffers.aux_regions))
    try:
        while conn.poll(_IDLE_LIMIT):
            op, *args = conn.recv()
            if op == "open":
                room, peer, pages, slot = args
                manager.receiver_construct(room)
                manager.receiver_init(room, (peer,))
                manager.receiver_send_metadata(room, np.asarray(pages), slot)
                conn.send("ok")
            elif op == "verify":
                room, pages, slot = args
                conn.send(
                    (buffers.mismatches(room, np.asarray(pages)), buffers.aux_matches(slot, room))
                )
            elif op == "exit":
                return
    except EOFError:
        return
    finally:
        manager.close()


class RemoteReceiver:
    """Handle on a child process running a receiver manager of ``name``."""

    def __init__(self, name: str, options: dict[str, Any], **shape: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, name, options, shape), daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(120):
            self.kill()
            raise TimeoutError("remote receiver did not start within 120s")
        self.endpoint, self.kv_regions, self.aux_regions = self._conn.recv()

    def _call(self, *message: Any) -> Any:
        self._conn.send(message)
        if not self._conn.poll(60):
            raise TimeoutError(f"remote receiver did not answer {message[0]!r}")
        return self._conn.recv()

    def open(self, room: int, peer: Any, pages: np.ndarray, slot: int) -> None:
        self._call("open", room, peer, np.asarray(pages).tolist(), slot)

    def verify(self, room: int, pages: np.ndarray, slot: int) -> tuple[list[str], bool]:
        return self._call("verify", room, np.asarray(pages).tolist(), slot)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("exit",))
            self.process.join(30)
        if self.process.is_alive():
            self.kill()
        self._conn.close()
