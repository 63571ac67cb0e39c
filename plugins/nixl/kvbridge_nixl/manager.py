"""Per-rank state of the NIXL transport: one NIXL agent, UCX backend by default.

Peers exchange agent metadata out of band: it travels in this rank's endpoint description
(bootstrap registration / control channel) and is loaded with ``add_remote_agent`` at init.
Each chunk per peer is one ``initialize_xfer`` + ``transfer`` (KV pages, then the aux row once
they landed); one worker thread per peer keeps up to ``writes_in_flight`` (64) rooms' transfers
in flight and checks them all in each pass (the kit's non-blocking writes, backing off from
20 us to 1 ms between passes: a ``sleep(0)`` spin would take the GIL from the engine's threads
thousands of times a second); agent calls are serialised by a lock.

Device memory: every region is registered as what it is, from ``MemoryRegion.device``: host
memory as ``DRAM`` (device id 0, NIXL's own convention for host memory), ``cuda:N`` as
``VRAM`` with device id ``N``, one ``register_memory`` per memory type. Transfer descriptors
take each run's source and destination device from the core's descriptors, one
``initialize_xfer`` per (source, destination) device pair (a NIXL descriptor list has one
memory type), so GPU KV with host aux rows, or KV on two GPUs, is described exactly.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from math import inf
from typing import Any

import numpy as np

from kvbridge.config import TransferConfig
from kvbridge.transport.kit import BookedManager, RoomBook, transport_options
from kvbridge.types import HOST, Descriptors, MemoryRegion, RankIdentity

log = logging.getLogger("kvbridge.nixl")
OPTIONS = {"backend": "UCX", "io_timeout": 30.0, "progress_thread": False, "writes_in_flight": 64}

#: ``progress_thread``: NIXL's own progress thread (``nixl_agent_config(enable_prog_thread)``,
#: on in NIXL by default). NIXL's Python API starts it with no wait between passes
#: (``pthrDelay = 0``, which it does not expose), so it spins: most of a core per agent, idle
#: or not (benchmarks/results/nixl_progress_thread.md), half of a 2-core host per rank. Off,
#: something else must progress the agent: a sender does in ``check_xfer_state`` (its polling
#: loop below), but a receiver has no call of its own, and without progress on the receiver
#: UCX lands the bytes while the sender's transfer never leaves ``PROC`` (measured over
#: loopback UCX). So with the thread off each agent gets a kvbridge thread that progresses it
#: (``get_new_notifs``: about 1 us) every ``PROGRESS_PAUSE`` while the manager has rooms, and
#: every ``IDLE_PAUSE`` while it has none (each pass wakes Python: at 1 kHz that is a few
#: percent of a core on a loaded host). A room's init wakes it, and a room is initialised
#: before any byte of it is written, so a write's completion waits at most ``PROGRESS_PAUSE``
#: for the receiver's next pass.
PROGRESS_PAUSE = 1e-3
IDLE_PAUSE = 20e-3


class _Write:
    """One chunk's transfers to one peer agent, started and not yet released."""

    __slots__ = ("agent", "done", "handles", "room")

    def __init__(self, room: int, agent: str) -> None:
        self.room = room
        self.agent = agent
        self.handles: list[Any] = []
        self.done = 0  # handles[:done] reported DONE

    def __str__(self) -> str:
        return f"nixl write of room {self.room} to {self.agent}"


def nixl_memory(device: int) -> tuple[str, int]:
    """NIXL's (memory type, device id) of a device code (-1 host, N for ``cuda:N``)."""
    return ("DRAM", 0) if device == HOST else ("VRAM", int(device))


#: Where the NIXL agent API lives: the ``nixl`` meta package (it picks the CUDA build at run
#: time) or, without it, a backend wheel imported directly (``kvbridge-nixl[cpu]`` installs
#: only nixl-cu12: the meta package also pulls nixl-cu13 and an unpinned torch).
NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")


def load_nixl() -> tuple[Any, Any]:
    import importlib

    errors = []
    for name in NIXL_MODULES:
        try:
            api = importlib.import_module(f"{name}._api")
        except ModuleNotFoundError as exc:
            if exc.name not in (name, f"{name}._api"):
                raise
            errors.append(f"{name}: not installed")
            continue
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        return api.nixl_agent, api.nixl_agent_config
    raise RuntimeError(
        f"NIXL is not importable ({'; '.join(errors)}); install it with "
        '`pip install "kvbridge-nixl[cpu]"` (CUDA hosts: "kvbridge-nixl[gpu]")'
    )


def nixl_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """The NIXL options merged over :data:`OPTIONS`, each checked: a bad one is a clear error
    when the manager is created, not a failed write later."""
    options = transport_options("nixl", given, OPTIONS)
    progress = options["progress_thread"]
    if not isinstance(progress, bool):
        raise ValueError(
            f"nixl transport option progress_thread must be true or false, got {progress!r} "
            "(true: NIXL's progress thread, which spins a core per rank; false: a kvbridge "
            "thread progresses the agent, every 1 ms while it has rooms)"
        )
    window = options["writes_in_flight"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            "nixl transport option writes_in_flight must be a whole number of at least 1 (rooms "
            f"whose writes to one peer may be in flight at once), got {window!r}"
        )
    timeout = options["io_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < inf:
        raise ValueError(
            "nixl transport option io_timeout must be a positive number of seconds, got "
            f"{timeout!r}"
        )
    return options


class NixlManager(BookedManager):
    def __init__(
        self,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: tuple[MemoryRegion, ...],
        aux_regions: tuple[MemoryRegion, ...],
    ) -> None:
        self.options = nixl_options(config.transport_options)
        progress = self.options["progress_thread"]
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        agent_cls, config_cls = load_nixl()
        self.name = f"kvbridge-{rank.role.value}-tp{rank.tp_rank}-{uuid.uuid4().hex[:10]}"
        self.agent = agent_cls(
            self.name,
            config_cls(backends=[self.options["backend"]], enable_prog_thread=progress),
        )
        super().__init__(f"{rank.label}@nixl:{self.name}", kv_regions, aux_regions)
        by_type: dict[str, list[tuple[int, int, int, str]]] = {}
        for r in kv_regions + aux_regions:
            mem_type, dev = nixl_memory(r.device_index)
            by_type.setdefault(mem_type, []).append((r.addr, r.length, dev, ""))
        self._reg: list[Any] = []
        for mem_type, entries in sorted(by_type.items()):
            descs = self.agent.get_reg_descs(entries, mem_type)
            try:
                self._reg.append(self.agent.register_memory(descs))
            except Exception as exc:
                for done in self._reg:
                    self.agent.deregister_memory(done)
                raise RuntimeError(
                    f"nixl could not register {len(entries)} region(s) as {mem_type} "
                    f"(devices {sorted({e[2] for e in entries})}) with backend "
                    f"{self.options['backend']}: {type(exc).__name__}: {exc}"
                ) from exc
        self._lock = threading.Lock()
        self._remote: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._idle = False  # the progress thread is in (or about to enter) its idle wait
        self._progress: threading.Thread | None = None
        if not progress:
            self._progress = threading.Thread(
                target=self._progress_loop, name=f"kvbridge-nixl-progress-{self.name}", daemon=True
            )
            self._progress.start()

    def _progress_loop(self) -> None:
        while not self._stop.is_set():
            # Marked idle before the look at the books: an init that reads False here added
            # its room before that look, so this pass sees it busy (see ``init``).
            self._idle = True
            # len() of the books' dicts without their locks: a hint, read again every pass.
            busy = bool(self.receivers.rooms or self.senders.rooms)
            if busy:
                self._idle = False
            self._wake.wait(PROGRESS_PAUSE if busy else IDLE_PAUSE)
            self._wake.clear()
            with self._lock:
                if self.agent is None:
                    return
                try:
                    self.agent.get_new_notifs()
                except Exception as exc:  # keep progressing: one bad pass must not stop all
                    log.debug("get_new_notifs: %s", exc)

    def init(self, book: RoomBook, room: int, peers: tuple[Mapping[str, Any], ...]) -> None:
        super().init(book, room, peers)
        # Out of an idle wait before the room's first write arrives. Only then: a busy pass
        # waits PROGRESS_PAUSE anyway, and Event.set (a lock and a notify) was the largest
        # single cost of a room's init.
        if self._idle:
            self._wake.set()

    @property
    def endpoint(self) -> dict[str, Any]:
        metadata = base64.b64encode(self.agent.get_agent_metadata()).decode()
        return {"agent": self.name, "metadata": metadata, "pid": os.getpid()}

    def check_peer(self, peer: Mapping[str, Any]) -> None:
        if not isinstance(peer.get("agent"), str) or not isinstance(peer.get("metadata"), str):
            raise ValueError(f"not a nixl endpoint: {sorted(peer)}")

    def peer_key(self, peer: Mapping[str, Any]) -> str:
        return str(peer["agent"])

    def connect_peer(self, peer: Mapping[str, Any]) -> None:
        if peer["agent"] not in self._remote:
            with self._lock:
                self.agent.add_remote_agent(base64.b64decode(peer["metadata"]))
            self._remote.add(peer["agent"])

    def _descs(self, addrs: np.ndarray, lengths: np.ndarray, device: int) -> Any:
        mem_type, dev = nixl_memory(device)
        table = np.empty((len(addrs), 3), dtype=np.uint64)
        table[:, 0] = addrs
        table[:, 1] = lengths
        table[:, 2] = dev
        return self.agent.get_xfer_descs(table, mem_type)

    def start_write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> _Write:
        # One transfer per (source device, destination device) pair; usually there is one.
        write = _Write(room, str(peer["agent"]))
        state = "DONE"
        try:
            for src_device, dst_device, group in runs.device_groups():
                with self._lock:
                    handle = self.agent.initialize_xfer(
                        "WRITE",
                        self._descs(group.src, group.lengths, src_device),
                        self._descs(group.dst, group.lengths, dst_device),
                        write.agent,
                    )
                    write.handles.append(handle)
                    state = self.agent.transfer(handle)
                if state not in ("PROC", "DONE"):
                    break
        except Exception as exc:  # nixl raises typed errors for bad memory and dead peers
            self.end_write(write)
            raise RuntimeError(f"{write} failed: {type(exc).__name__}: {exc}") from exc
        if state not in ("PROC", "DONE"):
            self.end_write(write)
            raise RuntimeError(f"{write} ended in state {state}")
        return write

    def write_done(self, handle: _Write) -> bool:
        with self._lock:
            for xfer in handle.handles[handle.done :]:
                try:
                    state = self.agent.check_xfer_state(xfer)
                except Exception as exc:
                    raise RuntimeError(f"{handle} failed: {type(exc).__name__}: {exc}") from exc
                if state == "PROC":
                    return False
                if state != "DONE":
                    raise RuntimeError(f"{handle} ended in state {state}")
                handle.done += 1
        return True

    def end_write(self, handle: _Write) -> None:
        with self._lock:
            for xfer in handle.handles:
                try:
                    self.agent.release_xfer_handle(xfer)
                except Exception as exc:
                    log.debug("release_xfer_handle: %s", exc)
        handle.handles.clear()

    def write_timeout(self) -> float:
        return float(self.options["io_timeout"])

    def writes_in_flight(self) -> int:
        return int(self.options["writes_in_flight"])

    def release(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._progress is not None:
            self._progress.join()
        with self._lock:
            for agent in self._remote:
                try:
                    self.agent.remove_remote_agent(agent)
                except Exception as exc:
                    log.debug("remove_remote_agent(%s): %s", agent, exc)
            for reg in self._reg:
                self.agent.deregister_memory(reg)
            # Drop the agent itself: its UCX workers and listener go with it, so peers that
            # still hold a connection see it gone instead of writing into released memory.
            self.agent = None
