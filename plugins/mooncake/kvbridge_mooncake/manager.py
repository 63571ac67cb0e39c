"""Per-rank state of the Mooncake transport.

Writes (``write_api`` ``"submit"``, the default): each descriptor of a chunk is started with
``transfer_submit_write`` and checked with ``transfer_check_status`` by the kit's one worker
thread per peer (:class:`~kvbridge.transport.kit.PipelinedPeerWorkers`), up to
``writes_in_flight`` rooms per peer at once and ``max_in_flight`` descriptors per rank; a
room's aux row starts only once its pages landed. Measured here (TCP, loopback), a 64 MiB
write takes as long either way, but ``batch_transfer_sync_write`` keeps its calling thread
spinning until the batch is done (caller CPU = wall time: 28 ms of CPU for 64 MiB) where
submit and check cost 1-3 ms; with the sync call one more thread per lane spins against the
engine for every write in flight.

Three behaviours of mooncake-transfer-engine-non-cuda 0.3.13 this module keeps clear of:
``transfer_check_status`` of a finished transfer answers 0 ("in flight") again (its batch is
freed and reused), so a status other than 0 is read once and the id never asked again; a
submit to a session the engine cannot reach returns id 0, and checking id 0 crashes the
process, so id 0 fails the descriptor without a check; more than about 4,000 descriptors in
flight fail with -1 (queue full), hence ``max_in_flight``. The asynchronous *batch* API is
not used: its ``get_batch_transfer_status`` blocks until the batch is done, and a second
query of a completed batch crashed the process.

``write_api`` ``"sync"``: one ``batch_transfer_sync_write`` call per chunk per peer on one of
``lanes_per_peer`` worker threads per peer.

Device memory: each region is registered with a Mooncake location from ``MemoryRegion.device``:
``cuda:N`` as location ``"cuda:N"`` (the engine's name for GPU N; RDMA picks the NICs near that
GPU), host memory as ``"*"`` (the engine finds each page's NUMA node itself and names it
``"cpu:<node>"``; a fixed ``"cpu:0"`` would be wrong on multi-socket hosts), one
``batch_register_memory`` per location. Writes need no location: the engine resolves source
and destination buffers from its own registrations and the peer's segment, which carries the
locations it registered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from kvbridge.config import TransferConfig
from kvbridge.transport.kit import BookedManager, transport_options
from kvbridge.types import Descriptors, MemoryRegion, RankIdentity

log = logging.getLogger("kvbridge.mooncake")
OPTIONS = {
    "protocol": "tcp",
    "device_name": "",
    "hostname": None,  # None: config.advertised_host
    "metadata_server": "P2PHANDSHAKE",
    "retries": 2,
    # "submit": transfer_submit_write + transfer_check_status, checked by one thread per
    # peer; "sync": batch_transfer_sync_write, one blocking call per chunk per lane.
    "write_api": "submit",
    # submit: rooms' writes in flight per peer, and descriptors in flight per rank.
    "writes_in_flight": 64,
    "max_in_flight": 1024,
    # sync: descriptors per call (the TCP transport refuses a batch that overfills its queue).
    "max_batch": 256,
    # sync: rooms to one peer written by this many threads at once (each call blocks until
    # its batch is done); a room's own writes stay in order on one of them.
    "lanes_per_peer": 1,
}
WRITE_APIS = ("submit", "sync")
#: transfer_check_status: still in flight / landed (anything else: failed).
IN_FLIGHT, LANDED = 0, 1
#: Pause before each retry. A write to a fresh peer now and then returns -1 and succeeds when
#: repeated; a really dead peer still fails within ~60 ms.
RETRY_DELAYS = (0.01, 0.05, 0.25)
#: Mooncake's location for host memory: "find the NUMA node yourself".
HOST_LOCATION = "*"


def mooncake_location(region: MemoryRegion) -> str:
    """The ``location`` argument Mooncake registers ``region`` with."""
    return f"cuda:{region.device_index}" if region.is_gpu else HOST_LOCATION


def load_engine_class() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise RuntimeError(
            "the Mooncake transfer engine is not importable "
            f"({exc}); install mooncake-transfer-engine (GPU hosts) or "
            "mooncake-transfer-engine-non-cuda (CPU hosts)"
        ) from None
    return TransferEngine


class MooncakeManager(BookedManager):
    def __init__(
        self,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: tuple[MemoryRegion, ...],
        aux_regions: tuple[MemoryRegion, ...],
    ) -> None:
        self.options = transport_options("mooncake", config.transport_options, OPTIONS)
        if self.options["write_api"] not in WRITE_APIS:
            raise ValueError(
                f"mooncake option write_api must be one of {WRITE_APIS}, got "
                f"{self.options['write_api']!r}"
            )
        for name, top in (("lanes_per_peer", 64), ("writes_in_flight", 4096)):
            value = self.options[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(
                    f"mooncake option {name} must be an integer 1..{top}, got {value!r}"
                )
        value = self.options["max_in_flight"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4000:
            # Above about 4,000 the TCP transport refuses descriptors (queue full).
            raise ValueError(
                f"mooncake option max_in_flight must be an integer 1..4000, got {value!r}"
            )
        if self.options["write_api"] == "submit" and self.options["lanes_per_peer"] != 1:
            raise ValueError(
                "mooncake option lanes_per_peer applies to write_api 'sync' only (with "
                "'submit' one thread per peer keeps writes_in_flight rooms in flight)"
            )
        self._in_flight = 0  # descriptors submitted and not yet seen to end, all peers
        self._in_flight_lock = threading.Lock()
        if self.options["hostname"] is None:
            # Mooncake listens on every interface and advertises this name to peers.
            self.options["hostname"] = config.advertised_host
        os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
        self.engine = load_engine_class()()
        ret = self.engine.initialize(
            self.options["hostname"],
            self.options["metadata_server"],
            self.options["protocol"],
            self.options["device_name"],
        )
        if ret != 0:
            raise RuntimeError(f"mooncake TransferEngine.initialize({self.options}) returned {ret}")
        self.session = f"{self.options['hostname']}:{self.engine.get_rpc_port()}"
        super().__init__(f"{rank.label}@mooncake:{self.session}", kv_regions, aux_regions)
        by_location: dict[str, list[MemoryRegion]] = {}
        for r in kv_regions + aux_regions:
            by_location.setdefault(mooncake_location(r), []).append(r)
        self._registered: list[int] = []
        for location, regions in by_location.items():
            ret = self.engine.batch_register_memory(
                [r.addr for r in regions], [r.length for r in regions], location
            )
            if ret != 0:
                self.release()
                raise RuntimeError(
                    f"mooncake could not register {len(regions)} regions at location "
                    f"{location!r} ({ret})"
                )
            self._registered += [r.addr for r in regions]

    @property
    def endpoint(self) -> dict[str, Any]:
        return {"session": self.session, "protocol": self.options["protocol"], "pid": os.getpid()}

    def check_peer(self, peer: Mapping[str, Any]) -> None:
        if not isinstance(peer.get("session"), str):
            raise ValueError(f"not a mooncake endpoint: {peer!r}")

    def peer_key(self, peer: Mapping[str, Any]) -> str:
        return str(peer["session"])

    def lanes_per_peer(self) -> int:
        return int(self.options["lanes_per_peer"])

    def pipelines_writes(self) -> bool:
        return bool(self.options["write_api"] == "submit")

    def writes_in_flight(self) -> int:
        return int(self.options["writes_in_flight"])

    # -- write_api "submit" ----------------------------------------------------------------------

    def start_write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> _Submitted:
        write = _Submitted(
            room, str(peer["session"]), runs.src.tolist(), runs.dst.tolist(), runs.lengths.tolist()
        )
        try:
            self._submit(write)
        except BaseException:
            self.end_write(write)  # the kit ends only writes that started
            raise
        return write

    def write_done(self, handle: _Submitted) -> bool:
        for i, batch in list(handle.pending.items()):
            status = self.engine.transfer_check_status(batch)
            if status == IN_FLIGHT:
                continue
            del handle.pending[i]  # never asked again: a finished id answers "in flight"
            self._release_slots(1)
            if status != LANDED:
                self._failed(handle, i, f"status {status}")
        self._submit(handle)
        return handle.next == len(handle.src) and not handle.pending and not handle.retry

    def end_write(self, handle: _Submitted) -> None:
        # Timed out or failed: its ids are dropped unchecked, their slots freed.
        if handle.pending:
            self._release_slots(len(handle.pending))
            handle.pending.clear()

    def _submit(self, write: _Submitted) -> None:
        """Start what ``write`` may start now: due retries first, then its next descriptors,
        while the rank has fewer than ``max_in_flight`` descriptors in flight."""
        now = time.monotonic()
        due = [i for i, at in write.retry.items() if at <= now]
        todo = due + list(range(write.next, len(write.src)))
        for i in todo:
            if not self._take_slot():
                return
            if i in write.retry:
                del write.retry[i]
            else:
                write.next = i + 1
            batch = self.engine.transfer_submit_write(
                write.session, write.src[i], write.dst[i], write.lengths[i]
            )
            if batch <= 0:  # not started (peer unreachable): never check this id
                self._release_slots(1)
                self._failed(write, i, f"submit returned {batch}")
            else:
                write.pending[i] = batch

    def _failed(self, write: _Submitted, i: int, why: str) -> None:
        tries = write.tries.get(i, 0)
        if tries >= int(self.options["retries"]):
            raise RuntimeError(
                f"mooncake write of room {write.room} to {write.session} failed ({why}, "
                f"{tries + 1} tries): peer gone or memory not registered there"
            )
        write.tries[i] = tries + 1
        delay = RETRY_DELAYS[min(tries, len(RETRY_DELAYS) - 1)]
        log.warning(
            "mooncake write of room %d to %s: %s; retrying in %.0f ms",
            write.room,
            write.session,
            why,
            delay * 1e3,
        )
        write.retry[i] = time.monotonic() + delay

    def _take_slot(self) -> bool:
        with self._in_flight_lock:
            if self._in_flight >= int(self.options["max_in_flight"]):
                return False
            self._in_flight += 1
            return True

    def _release_slots(self, n: int) -> None:
        with self._in_flight_lock:
            self._in_flight -= n

    # -- write_api "sync" ------------------------------------------------------------------------

    def write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> str | None:
        session = str(peer["session"])
        ret = self._write_batch(
            session, runs.src.tolist(), runs.dst.tolist(), runs.lengths.tolist()
        )
        if ret != 0:
            return (
                f"mooncake write of room {room} to {session} failed ({ret}): peer gone or "
                "memory not registered there"
            )
        return None

    def _write_batch(self, session: str, src: list[int], dst: list[int], lengths: list[int]) -> int:
        # The TCP transport rejects a batch that overfills its lane queue ("queue-full
        # rejection", -1), so large batches go in bounded slices, in order.
        step = max(int(self.options["max_batch"]), 1)
        for i in range(0, len(src), step):
            ret = self._write_slice(
                session, src[i : i + step], dst[i : i + step], lengths[i : i + step]
            )
            if ret != 0:
                return ret
        return 0

    def _write_slice(self, session: str, src: list[int], dst: list[int], lengths: list[int]) -> int:
        ret = self.engine.batch_transfer_sync_write(session, src, dst, lengths)
        for delay in RETRY_DELAYS[: int(self.options["retries"])]:
            if ret == 0:
                break
            log.warning(
                "mooncake write to %s returned %s; retrying in %.0f ms", session, ret, delay * 1e3
            )
            time.sleep(delay)
            ret = self.engine.batch_transfer_sync_write(session, src, dst, lengths)
        return ret

    def release(self) -> None:
        if self._registered:
            ret = self.engine.batch_unregister_memory(self._registered)
            if ret != 0:
                log.warning("mooncake unregister returned %s on %s", ret, self.label)


class _Submitted:
    """One chunk's runs to one peer under ``write_api`` "submit": what was started, what
    landed, what waits for a retry."""

    __slots__ = ("dst", "lengths", "next", "pending", "retry", "room", "session", "src", "tries")

    def __init__(
        self, room: int, session: str, src: list[int], dst: list[int], lengths: list[int]
    ) -> None:
        self.room = room
        self.session = session
        self.src, self.dst, self.lengths = src, dst, lengths
        self.next = 0  # the first descriptor not yet submitted
        self.pending: dict[int, int] = {}  # descriptor -> Mooncake batch id in flight
        self.retry: dict[int, float] = {}  # descriptor -> when to submit it again
        self.tries: dict[int, int] = {}  # descriptor -> failed tries so far
