"""Value objects passed across the plugin boundary.

Hook arguments are always these kvbridge-owned, immutable objects, never engine internals, so
that a transport cannot reach into an engine and an engine can change without breaking plugins.
"""

from __future__ import annotations

import enum
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


@attrs.frozen
class MemoryRegion:
    """A contiguous block of memory handed to the transport for registration.

    ``item_bytes`` is the size of one page (KV buffers) or one row (aux buffers); item ``i``
    starts at ``addr + i * item_bytes``.
    """

    addr: int = attrs.field(validator=_positive)
    length: int = attrs.field(validator=_positive)
    item_bytes: int = attrs.field(validator=_positive)
    device: str = "cpu"

    def __attrs_post_init__(self) -> None:
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

    @classmethod
    def of(cls, buffer: Any, item_bytes: int | None = None) -> MemoryRegion:
        """Describe a contiguous numpy array or torch tensor (first axis = items)."""
        if hasattr(buffer, "data_ptr"):  # torch.Tensor
            if not buffer.is_contiguous():
                raise MemoryRegistrationError("tensor must be contiguous to be registered")
            addr, length = buffer.data_ptr(), buffer.numel() * buffer.element_size()
            device = str(buffer.device)
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


def _names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(str(v) for v in values)


@attrs.frozen
class TransportInfo:
    """What a transport says about itself (returned by ``kvbridge_transport_info``)."""

    name: str
    api_version: str
    capabilities: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    description: str = ""


@attrs.frozen(eq=False)
class Descriptors:
    """A batch of one-sided writes: ``lengths[i]`` bytes from ``src[i]`` to ``dst[i]``.

    Three parallel int64 arrays, so a transport can hand them to a native batched API without a
    Python loop.
    """

    src: np.ndarray
    dst: np.ndarray
    lengths: np.ndarray

    def __attrs_post_init__(self) -> None:
        if not (len(self.src) == len(self.dst) == len(self.lengths)):
            raise ValueError("src, dst and lengths must have the same length")

    def __len__(self) -> int:
        return len(self.src)

    @property
    def total_bytes(self) -> int:
        return int(self.lengths.sum())

    @classmethod
    def empty(cls) -> Descriptors:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z)

    @classmethod
    def concat(cls, parts: Sequence[Descriptors]) -> Descriptors:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.src for p in parts]),
            np.concatenate([p.dst for p in parts]),
            np.concatenate([p.lengths for p in parts]),
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
