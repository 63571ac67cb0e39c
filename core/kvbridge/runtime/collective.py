"""The only module that talks to ``torch.distributed``, where rule 3 (the README) is kept.

The queues never call this themselves; a session builds its status vector, calls the reducer
once per step, and applies the result; an empty vector calls nothing.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Protocol

import numpy as np

from kvbridge.errors import LockstepError

log = logging.getLogger("kvbridge")


def init_gloo(
    rank: int, world: int, port: int, host: str = "127.0.0.1", timeout_s: float = 120.0
) -> None:
    """Join a gloo process group over TCP: what the demo, the benchmarks and the tests use."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


class Reducer(Protocol):
    """What a session calls once per step. A reducer may also have ``gather_causes`` (see
    :func:`gather_causes`): without it, a root cause seen only on a rank that tells decode
    nothing (a non-authoritative CP rank) reaches decode as "failed on another rank"."""

    def __call__(self, local: np.ndarray, rooms: np.ndarray) -> np.ndarray:
        """Return the element-wise MIN of ``local`` over the group (may reuse ``local``)."""


def gather_causes(reducer: Reducer, mine: dict[int, str]) -> list[dict[int, str]] | None:
    """Every rank's own root causes (``room -> reason``) for the rooms that aborted in this
    step, in group rank order; None when ``reducer`` cannot gather.

    A collective: call it on every rank of the group in the same step, which holds when the
    call depends only on the step's outcome (every rank aborts the same rooms in a step).
    """
    gather = getattr(reducer, "gather_causes", None)
    return None if gather is None else list(gather(mine))


class SingleRankReducer:
    """The reducer of a group of one: MIN over one rank is the rank's own vector."""

    def __call__(self, local: np.ndarray, rooms: np.ndarray) -> np.ndarray:
        return local

    def gather_causes(self, mine: dict[int, str]) -> list[dict[int, str]]:
        return [mine]


class TorchMinReducer:
    """All-reduce MIN over a ``torch.distributed`` process group (gloo on CPU).

    With ``debug_lockstep`` every call first checks that all ranks hold the same rooms in the
    same order, and raises :class:`LockstepError` naming the first differing room on every rank,
    instead of letting a mismatched collective hang or fail with a size error.
    """

    def __init__(self, group: Any = None, *, debug_lockstep: bool = False) -> None:
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self.group = group
        self.debug_lockstep = debug_lockstep
        self.calls = 0
        #: Group of one (known at the first call): MIN over one rank is the rank's own vector,
        #: so no collective runs (it cost ~0.1 ms of CPU per step and a gloo thread hand-off).
        self._alone: bool | None = None

    def __call__(self, local: np.ndarray, rooms: np.ndarray) -> np.ndarray:
        if self._alone is None:
            self._alone = self._dist.get_world_size(self.group) == 1
        if self._alone:
            self.calls += 1
            return local
        if self.debug_lockstep:
            self.check_lockstep(rooms)
        self.calls += 1
        tensor = self._torch.from_numpy(local)  # shares memory: the result lands in `local`
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MIN, group=self.group)
        return local

    def gather_causes(self, mine: dict[int, str]) -> list[dict[int, str]]:
        """All-gather of every rank's root causes: only in steps that aborted rooms."""
        if self._alone is None:
            self._alone = self._dist.get_world_size(self.group) == 1
        if self._alone:
            return [mine]
        every: list[Any] = [None] * self._dist.get_world_size(self.group)
        self._dist.all_gather_object(every, mine, group=self.group)
        return every

    def check_lockstep(self, rooms: np.ndarray) -> None:
        dist, torch = self._dist, self._torch
        size = dist.get_world_size(self.group)
        # crc32, not hash(): Python salts bytes hashes per process.
        mine = torch.tensor([len(rooms), zlib.crc32(rooms.tobytes())], dtype=torch.int64)
        gathered = [torch.zeros(2, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(gathered, mine, group=self.group)
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return
        every: list[Any] = [None] * size
        dist.all_gather_object(every, rooms.tolist(), group=self.group)
        raise LockstepError(describe_divergence(every))


def describe_divergence(queues: list[list[int]]) -> str:
    """Name the first position where ranks' queues differ."""
    longest = max(len(q) for q in queues)
    for pos in range(longest):
        column = [q[pos] if pos < len(q) else None for q in queues]
        if len(set(column)) > 1:
            detail = ", ".join(
                f"rank {r}: " + ("end of queue" if room is None else f"room {room}")
                for r, room in enumerate(column)
            )
            return (
                f"ranks' queues diverge at position {pos}, first differing room: {detail}; "
                f"lengths {[len(q) for q in queues]}. add() must get the same requests in the "
                f"same order on every rank"
            )
    return f"ranks' queues differ in length: {[len(q) for q in queues]}"
