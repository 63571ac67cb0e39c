"""A stand-in for the ``mori.io`` Python API, for machines without ROCm and RDMA.

Same names, call order, argument types and status values as mori.io's ``IOEngine``:
engines exchange packed ``EngineDesc``s and register each other; memory is registered by raw
pointer and described by packed ``MemoryDesc``s; ``batch_write(local_desc, local_offsets,
remote_desc, remote_offsets, sizes, uid)`` returns a ``TransferStatus`` that is polled with
``InProgress()`` / ``Succeeded()`` / ``Failed()`` / ``Code()`` / ``Message()``. It fails the
way the real one does: invalid registrations raise; offsets outside a registered region or an
unregistered remote engine give ``ERR_INVALID_ARGS`` / ``ERR_NOT_FOUND``; a dead peer gives
``ERR_RDMA_OP``. Bytes really move: over a loopback TCP connection to the target engine's
listener (in the stand-in's own frame format, :mod:`kvbridge_mori.standin_wire`), which
writes only into memory registered there.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import socket
import threading
from typing import Any

import numpy as np

from kvbridge_mori import standin_wire as wire

#: Stand-in only. False (default): GPU registrations raise, as on a host without a GPU. True:
#: they are accepted (the memory really is host memory) and recorded with their device id and
#: location in the MemoryDesc, so tests can check how GPU regions are registered and described.
GPU_AS_HOST = False


class StatusCode(enum.IntEnum):
    SUCCESS = 0
    INIT = 1
    IN_PROGRESS = 2
    ERR_INVALID_ARGS = 3
    ERR_NOT_FOUND = 4
    ERR_RDMA_OP = 5
    ERR_BAD_STATE = 6
    ERR_GPU_OP = 7


class BackendType(enum.Enum):
    Unknown = 0
    XGMI = 1
    RDMA = 2
    TCP = 3


class MemoryLocationType(enum.Enum):
    Unknown = 0
    CPU = 1
    GPU = 2


class IOEngineConfig:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port


class _Packed:
    FIELDS: tuple[str, ...] = ()

    def pack(self) -> bytes:
        return json.dumps({f: getattr(self, f) for f in self.FIELDS}).encode()

    @classmethod
    def unpack(cls, data: bytes) -> Any:
        obj = cls.__new__(cls)
        for key, value in json.loads(data).items():
            setattr(obj, key, value)
        return obj

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, f) == getattr(other, f) for f in self.FIELDS
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f) for f in self.FIELDS))


class EngineDesc(_Packed):
    FIELDS = ("key", "hostname", "host", "port")
    key: str
    hostname: str
    host: str
    port: int


class MemoryDesc(_Packed):
    FIELDS = ("engine_key", "id", "data", "size", "device_id", "loc")
    engine_key: str
    id: int
    data: int
    size: int
    device_id: int
    loc: str


class TransferStatus:
    def __init__(self) -> None:
        self._code = StatusCode.INIT
        self._message = ""
        self._done = threading.Event()

    def _finish(self, code: StatusCode, message: str = "") -> None:
        self._code, self._message = code, message
        self._done.set()

    def Code(self) -> StatusCode:
        return self._code

    def Message(self) -> str:
        return self._message

    def InProgress(self) -> bool:
        return self._code in (StatusCode.INIT, StatusCode.IN_PROGRESS)

    def Succeeded(self) -> bool:
        return self._code == StatusCode.SUCCESS

    def Failed(self) -> bool:
        return not self.InProgress() and not self.Succeeded()

    def Wait(self) -> None:
        self._done.wait()


class IOEngine:
    def __init__(self, key: str, config: IOEngineConfig) -> None:
        self._key = key
        self._listener = socket.create_server((config.host, config.port))
        self._desc = EngineDesc.unpack(
            json.dumps(
                {
                    "key": key,
                    "hostname": socket.gethostname(),
                    "host": config.host,
                    "port": self._listener.getsockname()[1],
                }
            ).encode()
        )
        self._backends: set[BackendType] = set()
        self._remotes: dict[str, EngineDesc] = {}
        self._memory: dict[int, MemoryDesc] = {}
        self._ids = itertools.count(1)
        self._uids = itertools.count(1)
        self._lock = threading.Lock()
        self._sockets: dict[str, socket.socket] = {}
        self._accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"mori-standin-{key}").start()

    # -- engines --------------------------------------------------------------------------------

    def get_engine_desc(self) -> EngineDesc:
        return self._desc

    def create_backend(self, type: BackendType, config: Any = None) -> None:
        if type not in (BackendType.RDMA, BackendType.TCP):
            raise NotImplementedError("backend not implemented yet")
        self._backends.add(type)

    def remove_backend(self, type: BackendType) -> None:
        self._backends.discard(type)

    def register_remote_engine(self, engine_desc: EngineDesc) -> None:
        self._remotes[engine_desc.key] = engine_desc

    def deregister_remote_engine(self, engine_desc: EngineDesc) -> None:
        self._remotes.pop(engine_desc.key, None)
        sock = self._sockets.pop(engine_desc.key, None)
        if sock is not None:
            sock.close()

    # -- memory ---------------------------------------------------------------------------------

    def register_memory(
        self, ptr: int, size: int, device_id: int, mem_loc: MemoryLocationType
    ) -> MemoryDesc:
        if mem_loc is MemoryLocationType.GPU and (not isinstance(device_id, int) or device_id < 0):
            raise RuntimeError(f"RegisterMemory: GPU memory needs a device id, got {device_id}")
        if not isinstance(ptr, int) or ptr <= 0 or size <= 0:
            raise RuntimeError(f"RegisterMemory: invalid buffer (ptr={ptr}, size={size})")
        if mem_loc is MemoryLocationType.GPU and not GPU_AS_HOST:
            raise RuntimeError("RegisterMemory: no GPU on this host (stand-in)")
        with self._lock:
            for other in self._memory.values():
                if ptr < other.data + other.size and other.data < ptr + size:
                    raise RuntimeError("RegisterMemory: region overlaps a registered region")
            desc = MemoryDesc.unpack(
                json.dumps(
                    {
                        "engine_key": self._key,
                        "id": next(self._ids),
                        "data": ptr,
                        "size": size,
                        "device_id": device_id,
                        "loc": mem_loc.name,
                    }
                ).encode()
            )
            self._memory[desc.id] = desc
        return desc

    def deregister_memory(self, mem_desc: MemoryDesc) -> None:
        with self._lock:
            self._memory.pop(mem_desc.id, None)

    def allocate_transfer_uid(self) -> int:
        return next(self._uids)

    # -- transfers ------------------------------------------------------------------------------

    def batch_write(
        self,
        local_dest_mem_desc: MemoryDesc,
        local_offsets: list[int],
        remote_src_mem_desc: MemoryDesc,
        remote_offsets: list[int],
        sizes: list[int],
        transfer_uid: int,
    ) -> TransferStatus:
        status = TransferStatus()
        local, remote = local_dest_mem_desc, remote_src_mem_desc
        lo, ro, sz = (np.asarray(x, dtype=np.int64) for x in (local_offsets, remote_offsets, sizes))
        if not self._backends:
            status._finish(StatusCode.ERR_BAD_STATE, "no backend created")
        elif not (len(lo) == len(ro) == len(sz)):
            status._finish(StatusCode.ERR_INVALID_ARGS, "offset and size lists differ in length")
        elif local.id not in self._memory or local.engine_key != self._key:
            status._finish(StatusCode.ERR_NOT_FOUND, "local memory is not registered")
        elif remote.engine_key not in self._remotes:
            status._finish(
                StatusCode.ERR_NOT_FOUND, f"remote engine {remote.engine_key} is not registered"
            )
        elif len(sz) and (
            (lo < 0).any()
            or (ro < 0).any()
            or (sz < 0).any()
            or (lo + sz > local.size).any()
            or (ro + sz > remote.size).any()
        ):
            status._finish(StatusCode.ERR_INVALID_ARGS, "offset + size outside memory region")
        else:
            status._code = StatusCode.IN_PROGRESS
            threading.Thread(
                target=self._push,
                daemon=True,
                args=(status, local, lo, remote, ro, sz, transfer_uid),
            ).start()
        return status

    def write(
        self,
        local_dest_mem_desc: MemoryDesc,
        local_offset: int,
        remote_src_mem_desc: MemoryDesc,
        remote_offset: int,
        size: int,
        transfer_uid: int,
    ) -> TransferStatus:
        return self.batch_write(
            local_dest_mem_desc,
            [local_offset],
            remote_src_mem_desc,
            [remote_offset],
            [size],
            transfer_uid,
        )

    def _push(
        self,
        status: TransferStatus,
        local: MemoryDesc,
        lo: np.ndarray,
        remote: MemoryDesc,
        ro: np.ndarray,
        sz: np.ndarray,
        uid: int,
    ) -> None:
        peer = self._remotes.get(remote.engine_key)
        if peer is None:
            status._finish(StatusCode.ERR_NOT_FOUND, "remote engine deregistered")
            return
        try:
            with self._lock:  # one frame at a time per engine keeps the stream in order
                sock = self._sockets.get(peer.key)
                if sock is None:
                    sock = socket.create_connection((peer.host, peer.port), timeout=30)
                    self._sockets[peer.key] = sock
                dst = remote.data + ro
                sock.sendall(wire.pack_request(uid, dst, sz))
                for offset, n in zip(lo.tolist(), sz.tolist()):
                    sock.sendall(wire.raw_memory(local.data + offset, n))
                ok, message = wire.recv_reply(sock)
        except OSError as exc:
            with self._lock:
                self._sockets.pop(peer.key, None)
            status._finish(StatusCode.ERR_RDMA_OP, f"remote engine {peer.key} unreachable: {exc}")
            return
        status._finish(StatusCode.SUCCESS if ok else StatusCode.ERR_INVALID_ARGS, message)

    def _covers(self, addr: int, n: int) -> bool:
        return any(m.data <= addr and addr + n <= m.data + m.size for m in self._memory.values())

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._accepted.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    _, dst, lengths = wire.read_request(conn)
                    with self._lock:
                        ok = all(self._covers(a, n) for a, n in zip(dst.tolist(), lengths.tolist()))
                    if ok:
                        for a, n in zip(dst.tolist(), lengths.tolist()):
                            wire.recv_into(conn, wire.raw_memory(a, n))
                    else:
                        wire.drain(conn, int(lengths.sum()))
                    wire.send_reply(conn, ok, "" if ok else "remote memory not registered")
                except (OSError, ConnectionError, wire.ProtocolError):
                    return

    def shutdown(self) -> None:
        """Stand-in only: stop listening, as a process exit would."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in [*self._sockets.values(), *self._accepted]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()
        self._accepted.clear()
