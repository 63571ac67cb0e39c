"""What a scheduler step hands back to the engine."""

from __future__ import annotations

import attrs
import numpy as np

#: The reason a rank gives for a room it aborted only because another rank failed (rule 7).
FROM_OTHER_RANK = "failed on another rank"


@attrs.frozen(eq=False)
class Committed:
    """A decode request whose KV and aux row landed on every rank.

    ``pages`` now belong to the engine (return them to the page pool when the request ends);
    ``aux_row`` is a copy of the metadata row (first output token, ...). The aux slot itself has
    already been freed.
    """

    room: int
    pages: np.ndarray
    aux_row: np.void


@attrs.frozen
class Aborted:
    """A request that failed; every rank reports it in the same step.

    ``from_other_rank`` is true where this rank saw nothing wrong itself.
    """

    room: int
    reason: str
    from_other_rank: bool = False


@attrs.frozen
class LateCause:
    """The root cause of a room this rank had already aborted as "failed on another rank".

    It arrived after the abort (rule 7): ``reason`` names its origin (``prefill KEY: ...``,
    ``decode aborted: decode KEY: ...``). The room's outcome does not change; this is for the
    engine's failure record.
    """

    room: int
    reason: str


@attrs.frozen
class DecodeStep:
    committed: tuple[Committed, ...] = ()
    #: Failed requests. An abort after the metadata went out fences the pages and aux slot:
    #: they stay allocated until every prefill rank that may write them has stopped.
    aborted: tuple[Aborted, ...] = ()
    #: Aborted rooms whose pages and aux slot are safe to reuse from now on, on every rank in
    #: the same step: at once when nothing can be writing them (the abort came before the
    #: metadata went out), else once the fence lifted. kvbridge frees pages it allocated
    #: itself; an engine that brought its own pages (``DecodeRequest.pages``) reuses them
    #: only after they appear here. Committed pages belong to the engine at once.
    released: tuple[int, ...] = ()
    #: Root causes that reached this rank after it aborted their rooms as "failed on
    #: another rank" (each room at most once).
    late_causes: tuple[LateCause, ...] = ()


@attrs.frozen
class PrefillStep:
    #: Rooms whose decode side is ready on every rank: run their forward pass now.
    ready: tuple[int, ...] = ()
    #: Rooms fully sent and acknowledged on every rank: their prefill KV can be freed.
    finished: tuple[int, ...] = ()
    aborted: tuple[Aborted, ...] = ()
    #: As :attr:`DecodeStep.late_causes`.
    late_causes: tuple[LateCause, ...] = ()
