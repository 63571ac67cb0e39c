"""Per-rank state of the Mooncake transport.

Writes use ``batch_transfer_sync_write`` (one call per chunk per peer, descriptors already
merged by the core) on one worker thread per peer, so the scheduler never blocks and writes to
one peer stay ordered. The asynchronous batch API was not used: on
mooncake-transfer-engine-non-cuda 0.3.13 a second ``get_batch_transfer_status`` on a
completed batch crashes the process.

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
    "max_batch": 256,
    # Rooms to one peer written by this many threads at once (each call blocks until its
    # batch is done); a room's own writes stay in order on one of them.
    "lanes_per_peer": 1,
}
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
        lanes = self.options["lanes_per_peer"]
        if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise ValueError(
                f"mooncake option lanes_per_peer must be an integer 1..64, got {lanes!r}"
            )
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
