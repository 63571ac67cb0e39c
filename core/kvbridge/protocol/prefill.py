"""The prefill side's bootstrap and in-flight queues, pure (rules 1, 2, 5 and 6 for prefill;
the rest of the prefill machine is :mod:`kvbridge.protocol.prefill_rooms`).

Stages: ``BOOTSTRAP`` (waiting for every decode rank's metadata) and ``INFLIGHT`` (forward pass
and sending). With context parallelism only the authoritative CP rank of each attention-TP
shard transfers; the other CP ranks are no-op participants: they start at WaitingForInput,
reach Success on the last chunk without sending, and still take part in every reduction so the
whole CP x TP group agrees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from kvbridge.protocol.columns import (
    BOOTSTRAPPING,
    FAILED,
    NEVER,
    SUCCESS,
    TRANSFERRING,
    WAITING,
    Columns,
)
from kvbridge.protocol.outcomes import FROM_OTHER_RANK, Aborted, PrefillStep

BOOTSTRAP = np.uint8(0)
INFLIGHT = np.uint8(1)
#: ``stage * 8 + reduced`` of the rooms that ask :meth:`PrefillQueue.apply` for a decision:
#: any failure, bootstrap rooms every rank has metadata for (ready), and finished rooms.
#: Rooms still waiting for metadata or being sent have none, which one look-up tells.
_ACTS = np.zeros(256, dtype=bool)
_ACTS[[int(FAILED), int(WAITING), int(TRANSFERRING), int(SUCCESS), 8 + int(FAILED)]] = True
_ACTS[8 + int(SUCCESS)] = True
_NOTHING = PrefillStep()


@attrs.frozen
class PrefillRequest:
    """A request the engine hands to kvbridge on every prefill rank, in the same order."""

    room: int

    def __attrs_post_init__(self) -> None:
        if not 0 < self.room < 2**64:
            raise ValueError(f"room must be in 1..2**64-1 (0 is reserved), got {self.room}")


class PrefillQueue:
    def __init__(
        self, *, authoritative: bool, bootstrap_timeout: float, waiting_timeout: float
    ) -> None:
        self.authoritative = authoritative
        self.bootstrap_timeout = bootstrap_timeout
        self.waiting_timeout = waiting_timeout
        self.cols = Columns()
        self.reasons: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.cols)

    @property
    def rooms(self) -> np.ndarray:
        return self.cols.rooms

    def add(self, requests: Sequence[PrefillRequest], now: float) -> None:
        rooms = [r.room for r in requests]
        if len(set(rooms)) != len(rooms) or any(self.cols.index_of(r) is not None for r in rooms):
            raise ValueError(f"rooms already queued among {rooms}")
        if self.authoritative:
            self.cols.append(rooms, BOOTSTRAPPING, now + self.bootstrap_timeout)
        else:
            self.cols.append(rooms, WAITING, NEVER)

    def metadata_complete(self, room: int) -> None:
        """Every decode rank this rank serves sent its metadata, and the sender is initialised."""
        i = self.cols.index_of(room)
        if i is not None and self.cols.local[i] == BOOTSTRAPPING:
            self.cols.local[i] = WAITING
            self.cols.deadline[i] = NEVER

    def renew(self, rooms: np.ndarray, now: float) -> int:
        """Decode still wants these rooms (it waits for memory): restart their bootstrap clock.

        Returns how many rooms were renewed (queued and still waiting for metadata).
        """
        renewed = 0
        for room in rooms.tolist():
            i = self.cols.index_of(room)
            if i is not None and self.cols.local[i] == BOOTSTRAPPING:
                self.cols.set_deadline(i, now + self.bootstrap_timeout)
                renewed += 1
        return renewed

    def sent(self, room: int, is_last: bool, now: float) -> None:
        i = self.cols.index_of(room)
        if i is None or self.cols.local[i] == FAILED:
            return
        if self.cols.stage[i] != INFLIGHT:
            raise ValueError(f"room {room} is not ready for sending (decode not bootstrapped)")
        if is_last:
            self.cols.local[i] = SUCCESS
            self.cols.set_deadline(i, now + self.waiting_timeout)
        else:
            self.cols.local[i] = max(self.cols.local[i], TRANSFERRING)

    def follow(self, room: int) -> None:
        """Fail ``room`` because a peer failed it, with no cause of this rank's own."""
        i = self.cols.index_of(room)
        if i is not None:
            self.cols.local[i] = FAILED

    def fail(self, room: int, reason: str) -> None:
        """A local failure. The first cause wins; a room only followed (:meth:`follow`) has
        none yet, so a cause seen before the abort becomes its reason (rule 7)."""
        i = self.cols.index_of(room)
        if i is None or room in self.reasons:
            return
        self.cols.local[i] = FAILED
        self.reasons[room] = reason

    def local_statuses(
        self, transport: np.ndarray, failures: Mapping[int, str], now: float
    ) -> np.ndarray:
        for room, reason in failures.items():
            self.fail(room, reason)
        cols = self.cols
        v = np.minimum(cols.local, transport)
        late = cols.overdue(now)
        for i in [] if late is None else late.tolist():
            if v[i] == SUCCESS or v[i] == FAILED:
                continue
            room = int(cols.rooms[i])
            if cols.stage[i] == BOOTSTRAP:
                reason = (
                    f"decode never sent metadata within bootstrap_timeout "
                    f"{self.bootstrap_timeout:g}s"
                )
            else:
                reason = (
                    f"transfer not acknowledged within waiting_timeout {self.waiting_timeout:g}s"
                )
            self.fail(room, reason)
            v[i] = FAILED
        return v

    def apply(self, reduced: np.ndarray) -> PrefillStep:
        cols = self.cols
        if len(reduced) != len(cols):
            raise ValueError(f"reduced vector has {len(reduced)} entries for {len(cols)} rooms")
        if not _ACTS[(cols.stage << 3) | reduced].any():
            return _NOTHING
        remove = reduced == FAILED
        aborted = []
        for i in remove.nonzero()[0].tolist():
            room = int(cols.rooms[i])
            own = self.reasons.pop(room, None)
            aborted.append(Aborted(room, own or FROM_OTHER_RANK, from_other_rank=own is None))
        finished_mask = (reduced == SUCCESS) & (cols.stage == INFLIGHT)
        finished = tuple(int(r) for r in cols.rooms[finished_mask].tolist())
        ready_mask = (reduced >= WAITING) & (cols.stage == BOOTSTRAP)
        ready = tuple(int(r) for r in cols.rooms[ready_mask].tolist())
        cols.stage[ready_mask] = INFLIGHT
        remove |= finished_mask
        if remove.any():
            cols.keep(~remove)
        for room in finished:
            self.reasons.pop(room, None)
        return PrefillStep(ready=ready, finished=finished, aborted=tuple(aborted))
