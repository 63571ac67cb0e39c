"""Columnar queue storage shared by the decode and prefill state machines.

Per-request state that every step touches lives in numpy columns, in queue order, so that
building the status vector and reading the reduced one costs a few vectorised operations,
not a Python loop over requests. Rare per-request data (page arrays, reasons) lives in dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbridge.status import KVPoll

FAILED = np.uint8(KVPoll.Failed)
BOOTSTRAPPING = np.uint8(KVPoll.Bootstrapping)
WAITING = np.uint8(KVPoll.WaitingForInput)
TRANSFERRING = np.uint8(KVPoll.Transferring)
SUCCESS = np.uint8(KVPoll.Success)
NEVER = np.inf


class Columns:
    """Rooms in queue order plus per-room numeric state columns."""

    def __init__(self) -> None:
        self.rooms = np.zeros(0, dtype=np.uint64)
        self.stage = np.zeros(0, dtype=np.uint8)
        self.local = np.zeros(0, dtype=np.uint8)  # protocol-level local status, sticky Failed
        self.deadline = np.zeros(0, dtype=np.float64)
        self.slot = np.zeros(0, dtype=np.int64)  # aux slot, -1 when none
        #: SUCCESS where the transport may only object (its Success is not needed), else 0.
        self.floor = np.zeros(0, dtype=np.uint8)
        self._index: dict[int, int] = {}
        self._next_deadline = NEVER

    def __len__(self) -> int:
        return len(self.rooms)

    def index_of(self, room: int) -> int | None:
        return self._index.get(room)

    def append(self, rooms: Sequence[int], local: int | np.integer[Any], deadline: float) -> None:
        n = len(rooms)
        self.rooms = np.concatenate([self.rooms, np.asarray(rooms, dtype=np.uint64)])
        self.stage = np.concatenate([self.stage, np.zeros(n, dtype=np.uint8)])
        self.local = np.concatenate([self.local, np.full(n, local, dtype=np.uint8)])
        self.deadline = np.concatenate([self.deadline, np.full(n, deadline, dtype=np.float64)])
        self.slot = np.concatenate([self.slot, np.full(n, -1, dtype=np.int64)])
        self.floor = np.concatenate([self.floor, np.zeros(n, dtype=np.uint8)])
        self._next_deadline = min(self._next_deadline, deadline)
        self._reindex()

    def keep(self, mask: np.ndarray) -> None:
        self.rooms = self.rooms[mask]
        self.stage = self.stage[mask]
        self.local = self.local[mask]
        self.deadline = self.deadline[mask]
        self.slot = self.slot[mask]
        self.floor = self.floor[mask]
        self._next_deadline = float(self.deadline.min()) if len(self.deadline) else NEVER
        self._reindex()

    def set_deadline(self, i: int, deadline: float) -> None:
        self.deadline[i] = deadline
        self._next_deadline = min(self._next_deadline, deadline)

    def overdue(self, now: float) -> np.ndarray | None:
        """Indices whose deadline passed, or None cheaply when none can have."""
        if now <= self._next_deadline:
            return None
        late = (now > self.deadline).nonzero()[0]
        if not late.size:
            self._next_deadline = float(self.deadline.min())
        return late

    def _reindex(self) -> None:
        self._index = {room: i for i, room in enumerate(self.rooms.tolist())}
