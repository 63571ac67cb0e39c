"""Per-rank state of the Mori transport, written against the ``mori.io`` IOEngine API.

mori.io addresses memory as (MemoryDesc, offset), so this rank publishes a packed MemoryDesc
per registered region in its endpoint, and a sender turns each (src, dst, length) run into
offsets within the local and remote regions that contain it. Runs are grouped per
(local region, remote region) pair into one ``batch_write`` each; KV groups go first and the
aux row last. Waiting for the ``TransferStatus`` happens on a worker thread per peer.

Device memory: each region is registered as what ``MemoryRegion.device`` says:
``register_memory(addr, length, N, MemoryLocationType.GPU)`` for ``cuda:N`` (torch on ROCm
names AMD GPUs ``cuda:N``), ``register_memory(addr, length, -1, MemoryLocationType.CPU)`` for
host memory. The resulting MemoryDescs carry device id and location; the peer's arrive packed
in its endpoint, so each ``batch_write`` names both sides' devices through its descriptors.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import uuid
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from kvbridge.config import TransferConfig
from kvbridge.transport.kit import BookedManager, transport_options
from kvbridge.types import Descriptors, MemoryRegion, RankIdentity

log = logging.getLogger("kvbridge.mori")
#: ``host`` None: ``config.advertised_host`` (the engine binds and advertises one address).
OPTIONS = {"backend": "RDMA", "host": None, "port": 0, "io_timeout": 30.0}


class _Regions:
    """Registered regions of one engine with their MemoryDescs, searchable by address."""

    def __init__(self, entries: list[tuple[int, int, Any]]) -> None:
        entries = sorted(entries, key=lambda e: e[0])
        self.starts = np.array([e[0] for e in entries], dtype=np.int64)
        self.ends = np.array([e[0] + e[1] for e in entries], dtype=np.int64)
        self.descs = [e[2] for e in entries]

    def locate(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Index of the region holding each run, or -1."""
        if not len(self.starts):
            return np.full(len(addrs), -1)
        idx = np.searchsorted(self.starts, addrs, side="right") - 1
        ok = (idx >= 0) & (addrs + lengths <= self.ends[np.clip(idx, 0, None)])
        return np.where(ok, idx, -1)


class MoriManager(BookedManager):
    def __init__(
        self,
        io: ModuleType,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: tuple[MemoryRegion, ...],
        aux_regions: tuple[MemoryRegion, ...],
    ) -> None:
        self.options = transport_options("mori", config.transport_options, OPTIONS)
        self.io = io
        self.key = f"kvbridge-{rank.role.value}-tp{rank.tp_rank}-{uuid.uuid4().hex[:10]}"
        backend = getattr(io.BackendType, str(self.options["backend"]), None)
        if backend is None:
            raise ValueError(f"mori backend {self.options['backend']!r} unknown")
        self.engine = io.IOEngine(
            self.key,
            io.IOEngineConfig(
                host=self.options["host"] or config.advertised_host, port=int(self.options["port"])
            ),
        )
        self.engine.create_backend(backend)
        super().__init__(f"{rank.label}@mori:{self.key}", kv_regions, aux_regions)
        regions = kv_regions + aux_regions
        self._descs = [self._register(r) for r in regions]
        self.local = _Regions([(r.addr, r.length, d) for r, d in zip(regions, self._descs)])
        self._peers: dict[str, tuple[Any, _Regions]] = {}

    def _register(self, region: MemoryRegion) -> Any:
        location = (
            self.io.MemoryLocationType.GPU if region.is_gpu else self.io.MemoryLocationType.CPU
        )
        # device_index is the GPU ordinal, or -1 for host memory (what mori.io expects there).
        return self.engine.register_memory(
            region.addr, region.length, region.device_index, location
        )

    @property
    def endpoint(self) -> dict[str, Any]:
        def b64(desc: Any) -> str:
            return base64.b64encode(desc.pack()).decode()

        return {
            "key": self.key,
            "engine": b64(self.engine.get_engine_desc()),
            "regions": [
                [int(s), int(e - s), b64(d)]
                for s, e, d in zip(self.local.starts, self.local.ends, self.local.descs)
            ],
            "pid": os.getpid(),
        }

    def check_peer(self, peer: Mapping[str, Any]) -> None:
        if not {"key", "engine", "regions"} <= set(peer):
            raise ValueError(f"not a mori endpoint: {sorted(peer)}")

    def peer_key(self, peer: Mapping[str, Any]) -> str:
        return str(peer["key"])

    def connect_peer(self, peer: Mapping[str, Any]) -> None:
        if peer["key"] in self._peers:
            return
        desc = self.io.EngineDesc.unpack(base64.b64decode(peer["engine"]))
        self.engine.register_remote_engine(desc)
        remote = _Regions(
            [(a, n, self.io.MemoryDesc.unpack(base64.b64decode(d))) for a, n, d in peer["regions"]]
        )
        self._peers[peer["key"]] = (desc, remote)

    def write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> str | None:
        key = str(peer["key"])
        _, remote = self._peers[key]
        src_region = self.local.locate(runs.src, runs.lengths)
        dst_region = remote.locate(runs.dst, runs.lengths)
        if (dst_region < 0).any():
            i = int(np.argmax(dst_region < 0))
            return (
                f"room {room}: destination [{int(runs.dst[i]):#x}, +{int(runs.lengths[i])})"
                f" is not in memory {key} registered"
            )
        # mori.io addresses (descriptor, offset): one batch_write per region pair.
        for s, t in sorted({(int(a), int(b)) for a, b in zip(src_region, dst_region)}):
            sel = (src_region == s) & (dst_region == t)
            status = self.engine.batch_write(
                self.local.descs[s],
                (runs.src[sel] - self.local.starts[s]).tolist(),
                remote.descs[t],
                (runs.dst[sel] - remote.starts[t]).tolist(),
                runs.lengths[sel].tolist(),
                self.engine.allocate_transfer_uid(),
            )
            deadline = time.monotonic() + float(self.options["io_timeout"])
            while status.InProgress():
                if time.monotonic() > deadline:
                    return f"mori write of room {room} to {key} timed out"
                time.sleep(0)
            if not status.Succeeded():
                return (
                    f"mori batch_write of room {room} to {key} failed: "
                    f"{status.Code()} {status.Message()}"
                )
        return None

    def release(self) -> None:
        for desc, _ in self._peers.values():
            try:
                self.engine.deregister_remote_engine(desc)
            except Exception as exc:
                log.debug("deregister_remote_engine: %s", exc)
        for desc in self._descs:
            self.engine.deregister_memory(desc)
        self.engine = None
