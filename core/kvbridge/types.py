"""Value objects passed across the plugin boundary.

Hook arguments are always these kvbridge-owned, immutable objects, never engine internals, so
that a transport cannot reach into an engine and an engine can change without breaking plugins.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from kvbridge.errors import MemoryRegistrationError

#: A transport's endpoint description: JSON-safe, published through bootstrap registration and
#: handed to peers unchanged. Its keys are the transport's own business.
Endpoint = Mapping[str, Any]


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class RankIdentity:
    """Where one rank sits in its engine's parallel layout."""

    role: Role
    tp_rank: int = attrs.field(default=0, validator=_non_negative)
    tp_size: int = attrs.field(default=1, validator=_positive)
    cp_rank: int = attrs.field(default=0, validator=_non_negative)
    cp_size: int = attrs.field(default=1, validator=_positive)
    dp_rank: int = attrs.field(default=0, validator=_non_negative)
    dp_size: int = attrs.field(default=1, validator=_positive)
    pp_rank: int = attrs.field(default=0, validator=_non_negative)
    pp_size: int = attrs.field(default=1, validator=_positive)

    def __attrs_post_init__(self) -> None:
        for axis in ("tp", "cp", "dp", "pp"):
            rank, size = getattr(self, f"{axis}_rank"), getattr(self, f"{axis}_size")
            if rank >= size:
                raise ValueError(f"{axis}_rank {rank} is out of range for {axis}_size {size}")

    @property
    def label(self) -> str:
        return (
            f"{self.role.value}[dp{self.dp_rank} pp{self.pp_rank} cp{self.cp_rank} "
            f"tp{self.tp_rank}]"
        )


#: Device names a region may carry, everywhere (registration, the control wire, descriptors):
#: ``cpu`` (host memory, pinned or not) or ``cuda:N`` (GPU ordinal N; torch on ROCm reports its
#: GPUs as ``cuda`` too, so AMD GPUs are ``cuda:N`` as well).
DEVICE_PATTERN = re.compile(r"cpu|cuda:(0|[1-9][0-9]{0,3})")
#: Longest device name accepted from a peer.
MAX_DEVICE_CHARS = 16
#: Device code of host memory in :class:`Descriptors` (torch's ``get_device()`` for CPU, too).
HOST = -1


def device_index(device: str) -> int:
    """``-1`` for ``cpu``, ``N`` for ``cuda:N``; ValueError for any other name."""
    if not isinstance(device, str) or len(device) > MAX_DEVICE_CHARS:
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r:.40}")
    return _device_index(device)


@functools.lru_cache(maxsize=256)
def _device_index(device: str) -> int:
    if not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(
            f"device {device!r} is not supported: regions live on 'cpu' or 'cuda:N' "
            "(torch on ROCm names AMD GPUs 'cuda:N' too)"
        )
    return HOST if device == "cpu" else int(device[5:])


def device_name(index: int) -> str:
    """The device name of a :class:`Descriptors` device code (inverse of :func:`device_index`)."""
    return "cpu" if index == HOST else f"cuda:{int(index)}"


def _device(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        device_index(value)
    except ValueError as exc:
        raise MemoryRegistrationError(str(exc)) from None


def _tensor_device(tensor: Any) -> str:
    """The region device of a torch tensor (or an object that looks like one), or raise."""
    device = tensor.device
    kind, index = getattr(device, "type", None), getattr(device, "index", None)
    if kind is None:  # a plain string such as "cuda:1"
        text = str(device)
        kind, _, rest = text.partition(":")
        index = int(rest) if rest.isdigit() else None
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        if index is None:
            raise MemoryRegistrationError(
                "tensor is on 'cuda' without a device index; name the GPU ('cuda:N')"
            )
        return f"cuda:{int(index)}"
    raise MemoryRegistrationError(
        f"tensor is on device {str(device)!r}, which kvbridge cannot register: KV and aux "
        "buffers must be on 'cpu' or a GPU ('cuda:N'; torch on ROCm reports AMD GPUs as "
        "'cuda' too)"
    )


@attrs.frozen
class MemoryRegion:
    """A contiguous block of memory handed to the transport for registration.

    ``item_bytes`` is the size of one page (KV buffers) or one row (aux buffers); item ``i``
    starts at ``addr + i * item_bytes``. ``device`` is ``cpu`` or ``cuda:N``
    (:data:`DEVICE_PATTERN`); transports register and describe the region as that device's
    memory, and it travels to the peer with the region.
    """

    addr: int = attrs.field(validator=_positive)
    length: int = attrs.field(validator=_positive)
    item_bytes: int = attrs.field(validator=_positive)
    device: str = attrs.field(default="cpu", validator=_device)
    #: GPU ordinal, or :data:`HOST` (-1) for host memory; derived from ``device`` once, as
    #: descriptor building reads it for every region of every chunk.
    device_index: int = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "device_index", device_index(self.device))
        if self.length % self.item_bytes:
            raise MemoryRegistrationError(
                f"region length {self.length} is not a multiple of item_bytes {self.item_bytes}"
            )

    @property
    def num_items(self) -> int:
        return self.length // self.item_bytes

    @property
    def end(self) -> int:
        return self.addr + self.length

    @property
    def is_gpu(self) -> bool:
        return self.device_index != HOST

    @classmethod
    def of(cls, buffer: Any, item_bytes: int | None = None) -> MemoryRegion:
        """Describe a contiguous numpy array or torch tensor (first axis = items).

        CUDA tensors (ROCm ones too) are described in place: no copy, no device
        synchronisation (only ``data_ptr``, sizes and ``device`` are read). Non-contiguous
        tensors, tensors on other devices (``mps``, ``meta``, ``xla``...) and ``cuda`` without
        an index are refused with :class:`MemoryRegistrationError`.
        """
        if hasattr(buffer, "data_ptr"):  # torch.Tensor
            device = _tensor_device(buffer)
            if not buffer.is_contiguous():
                raise MemoryRegistrationError(
                    f"tensor on {device} must be contiguous to be registered (shape "
                    f"{tuple(buffer.shape)}); register the contiguous buffer it is a view of"
                )
            addr, length = buffer.data_ptr(), buffer.numel() * buffer.element_size()
            rows = buffer.shape[0] if buffer.dim() else 1
        else:
            array = np.asarray(buffer)
            if not array.flags.c_contiguous:
                raise MemoryRegistrationError("array must be C-contiguous to be registered")
            addr, length, device = array.ctypes.data, array.nbytes, "cpu"
            rows = array.shape[0] if array.ndim else 1
        if item_bytes is None:
            item_bytes = length // max(rows, 1)
        return cls(addr=addr, length=length, item_bytes=item_bytes, device=device)


class Capability(str, enum.Enum):
    """Optional behaviour a transport declares in :attr:`TransportInfo.capabilities`.

    The core and the conformance kit act on these; a name that is not one of them is refused
    when the plugin loads (a misspelt ``one_sided_writes`` would otherwise silently weaken the
    abort fence).
    """

    #: Moves bytes between processes (the kit then tests a receiver in another process).
    CROSS_PROCESS = "cross_process"
    #: The receiver cannot refuse a write (RDMA-style): a silent writer may come back and
    #: finish one, so its being declared dead does not lift the fence; only its drain
    #: acknowledgement or its replacement does.
    ONE_SIDED_WRITES = "one_sided_writes"
    #: A write into memory the receiver never registered fails the room.
    REJECTS_UNREGISTERED_MEMORY = "rejects_unregistered_memory"
    #: Faults can be injected through transport options (the Fake).
    FAULT_INJECTION = "fault_injection"


def _capabilities(values: Iterable[str]) -> frozenset[Capability]:
    known = {c.value: c for c in Capability}
    out = set()
    for value in values:
        name = str(getattr(value, "value", value))
        if name not in known:
            raise ValueError(
                f"unknown transport capability {name!r}; known: {', '.join(sorted(known))}"
            )
        out.add(known[name])
    return frozenset(out)


@attrs.frozen
class TransportInfo:
    """What a transport says about itself (returned by ``kvbridge_transport_info``)."""

    name: str
    api_version: str
    capabilities: frozenset[Capability] = attrs.field(default=frozenset(), converter=_capabilities)
    description: str = ""

    @property
    def one_sided_writes(self) -> bool:
        """See :attr:`Capability.ONE_SIDED_WRITES`: the fence policy reads this."""
        return Capability.ONE_SIDED_WRITES in self.capabilities


def _host_devices(self: Descriptors) -> np.ndarray:
    return np.full(len(self.src), HOST, dtype=np.int32)


@attrs.frozen(eq=False)
class Descriptors:
    """A batch of one-sided writes: ``lengths[i]`` bytes from ``src[i]`` to ``dst[i]``.

    Three parallel int64 arrays, so a transport can hand them to a native batched API without a
    Python loop, and two parallel int32 arrays naming the device of each run's source and
    destination region: ``-1`` (:data:`HOST`) for host memory, ``N`` for ``cuda:N``
    (:func:`device_index`, torch's ``get_device()`` convention). Left out, they mean host
    memory. A device code per run (rather than a region index) is self-contained: the sender
    does not know the peer's region list, concatenation and masking stay plain array
    operations, and a transport groups runs by ``(src_device, dst_device)`` in one pass
    (:meth:`device_groups`).
    """

    src: np.ndarray
    dst: np.ndarray
    lengths: np.ndarray
    src_device: np.ndarray = attrs.field(
        default=attrs.Factory(_host_devices, takes_self=True), kw_only=True
    )
    dst_device: np.ndarray = attrs.field(
        default=attrs.Factory(_host_devices, takes_self=True), kw_only=True
    )

    def __attrs_post_init__(self) -> None:
        if not (
            len(self.src)
            == len(self.dst)
            == len(self.lengths)
            == len(self.src_device)
            == len(self.dst_device)
        ):
            raise ValueError("src, dst, lengths, src_device and dst_device must have one length")

    def __len__(self) -> int:
        return len(self.src)

    @property
    def total_bytes(self) -> int:
        return int(self.lengths.sum())

    def select(self, which: np.ndarray | slice) -> Descriptors:
        """The runs picked by a boolean mask, an index array or a slice, devices included."""
        return Descriptors(
            self.src[which],
            self.dst[which],
            self.lengths[which],
            src_device=self.src_device[which],
            dst_device=self.dst_device[which],
        )

    def device_groups(self) -> list[tuple[int, int, Descriptors]]:
        """``(src_device, dst_device, runs)`` per distinct device pair, in first-seen order.

        One group (no copy) when every run has the same pair, as in the common case.
        """
        if not len(self):
            return []
        s, d = self.src_device, self.dst_device
        if s.min() == s.max() and d.min() == d.max():
            return [(int(s[0]), int(d[0]), self)]
        pair = (s.astype(np.int64) << 32) | (d.astype(np.int64) & 0xFFFFFFFF)
        _, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
        out = []
        for g in np.argsort(first):
            i = int(first[g])
            out.append((int(s[i]), int(d[i]), self.select(inverse.reshape(-1) == g)))
        return out

    @classmethod
    def empty(cls) -> Descriptors:
        z = np.zeros(0, dtype=np.int64)
        e = np.zeros(0, dtype=np.int32)
        return cls(z, z, z, src_device=e, dst_device=e)

    @classmethod
    def concat(cls, parts: Sequence[Descriptors]) -> Descriptors:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.src for p in parts]),
            np.concatenate([p.dst for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            src_device=np.concatenate([p.src_device for p in parts]),
            dst_device=np.concatenate([p.dst_device for p in parts]),
        )


@attrs.frozen
class PeerWrite:
    """Writes for one peer: ``peer`` indexes the endpoints given to ``kvbridge_sender_init``."""

    peer: int
    descriptors: Descriptors


@attrs.frozen
class SendChunk:
    """One chunk of a request's KV, possibly empty; ``is_last`` carries the aux row."""

    writes: tuple[PeerWrite, ...]
    is_last: bool


@attrs.frozen
class PollResult:
    """Batched poll answer: ``statuses[i]`` belongs to the i-th polled room.

    ``failures`` maps a failed room to its reason; rooms missing from it get a generic reason.
    """

    statuses: Sequence[int] | np.ndarray
    failures: Mapping[int, str] = attrs.field(factory=dict)
