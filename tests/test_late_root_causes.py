"""A root cause that reaches a rank after the room aborted there still reaches someone (rule 7).

Issue 22, defect 1: a follower's notice can end a room on every rank of a group (the MIN)
before the root cause arrives; the cause then found no room and was dropped, so every rank of
that group said "failed on another rank". Now it is kept (only from the room's writers or
decode ranks, once per room, bounded), logged, told to the observers and handed to the engine
in the next step's ``late_causes``; and a prefill rank that ended a room with its own cause
answers a follower's abort with that cause.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_prefill_session import make_session

from kvbridge import AuxLayout, AuxSlotPool, PagePool, TransferConfig, Transport, hookimpl
from kvbridge.observe import ObserverRelay
from kvbridge.protocol.decode import (
    FROM_OTHER_RANK,
    MAX_FOLLOWED,
    AbortNotice,
    DecodeQueue,
    DecodeRequest,
)
from kvbridge.protocol.outcomes import LateCause
from kvbridge.protocol.plan import PrefillTarget
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.collective import SingleRankReducer
from kvbridge.runtime.decode_session import DecodeSession
from kvbridge.status import KVPoll
from kvbridge.testing import RankBuffers
from kvbridge.transport.loading import TransportRegistry
from kvbridge.types import RankIdentity, Role

ROOM = 7
ROOT = "prefill p1: out of memory"


def _rank(writer: str, transfer: bool) -> DecodeQueue:
    aux = AuxLayout().allocate(4)
    pages = PagePool(8)
    if not transfer:
        pages.alloc(8)  # no memory: the room waits in pre-allocation
    q = DecodeQueue(pages, AuxSlotPool(aux["room"]), aux, bootstrap_timeout=5, waiting_timeout=5)
    q.add([DecodeRequest(ROOM, 2)], 0.0)
    q.initialised(ROOM, 1, [writer])
    return q


def _step(ranks: list[DecodeQueue], now: float) -> list:
    vectors = [
        q.local_statuses(np.full(len(q), KVPoll.WaitingForInput, dtype=np.uint8), {}, now)
        for q in ranks
    ]
    reduced = np.minimum.reduce(vectors)
    return [q.apply(reduced, now) for q in ranks]


@settings(max_examples=60, deadline=None)
@given(
    transfer=st.booleans(),
    follow_at=st.integers(0, 3),
    root_at=st.integers(0, 3),
)
def test_decode_some_rank_names_the_root_cause_whatever_the_arrival_order(
    transfer: bool, follow_at: int, root_at: int
) -> None:
    """Rank A hears only its writer p0's follow, rank B only p1's root cause."""
    a, b = _rank("p0", transfer), _rank("p1", transfer)
    reported: dict[int, list[str]] = {0: [], 1: []}
    for step in range(6):
        if step == follow_at:
            assert a.peer_failed(ROOM, "p0", None)
        if step == root_at:
            assert b.peer_failed(ROOM, "p1", ROOT)
        for k, d in enumerate(_step([a, b], 0.1 * (step + 1))):
            reported[k] += [x.reason for x in d.step.aborted]
        for k, q in enumerate((a, b)):
            reported[k] += [c.reason for c in q.take_late_causes()]
    for k in (0, 1):
        assert reported[k] and set(reported[k]) <= {ROOT, FROM_OTHER_RANK}, reported
        assert reported[k].count(ROOT) <= 1
    assert ROOT in reported[1], reported  # B heard the cause: it names it, late or not
    assert reported[0] == [FROM_OTHER_RANK]  # A never heard it: it says so, once


def test_decode_a_late_cause_counts_only_from_a_writer_once_and_is_bounded() -> None:
    a, b = _rank("p0", False), _rank("p1", False)
    a.peer_failed(ROOM, "p0", None)
    assert [d.step.aborted[0].reason for d in _step([a, b], 0.1)] == [FROM_OTHER_RANK] * 2
    assert not b.peer_failed(ROOM, "p0", "forged")  # p0 does not write room 7 on rank B
    assert b.untrusted == 1 and b.take_late_causes() == ()
    assert b.peer_failed(ROOM, "p1", ROOT)
    assert b.peer_failed(ROOM, "p1", "a second cause")  # ignored: one per room
    assert b.take_late_causes() == (LateCause(ROOM, ROOT),)
    assert b.take_late_causes() == ()
    # A room a rank aborted with its own cause takes no late cause at all.
    a2 = _rank("p0", False)
    a2.fail(ROOM, "own cause")
    _step([a2], 0.1)
    a2.peer_failed(ROOM, "p0", ROOT)
    assert a2.take_late_causes() == ()
    # Bounded: only the most recent MAX_FOLLOWED rooms are remembered.
    assert len(b._followed) <= MAX_FOLLOWED


class _Seen:
    def __init__(self) -> None:
        self.causes: list[tuple[Role, int, str]] = []

    @hookimpl
    def kvbridge_root_cause(self, role: Role, rank: RankIdentity, room: int, reason: str) -> None:
        self.causes.append((role, room, reason))


class _Directory:
    def __init__(self, target: PrefillTarget) -> None:
        self.target = target

    def resolve(self, requests):
        return {r.room: self.target for r in requests}


def _decode_session(notices: list, observers: ObserverRelay | None = None):
    config = TransferConfig()
    transport = Transport(TransportRegistry.discover().get("fake"))
    dbuf, pbuf = RankBuffers.allocate(), RankBuffers.allocate()
    dmgr = transport.create_manager(
        config, RankIdentity(Role.DECODE), dbuf.kv_regions, dbuf.aux_regions
    )
    pmgr = transport.create_manager(
        config, RankIdentity(Role.PREFILL), pbuf.kv_regions, pbuf.aux_regions
    )
    target = PrefillTarget((pmgr.endpoint,), controls=("p1",))
    session = DecodeSession(
        config=config,
        manager=dmgr,
        pages=PagePool(8),
        aux=dbuf.aux,
        reducer=SingleRankReducer(),
        directory=_Directory(target),
        send_metadata=lambda meta, target: None,
        send_abort=notices.append,
        observers=observers,
    )
    return session, target, (dmgr, pmgr)


def test_decode_session_hands_a_late_cause_to_the_log_the_observers_and_the_engine(
    caplog,
) -> None:
    seen = _Seen()
    session, _, (dmgr, pmgr) = _decode_session([], ObserverRelay([seen]))
    try:
        session.add([DecodeRequest(ROOM, 2)])
        session.step()
        session.notify_done(ROOM, "p1", False, FROM_OTHER_RANK, root=False)
        (aborted,) = session.step().aborted
        assert (aborted.reason, aborted.from_other_rank) == (FROM_OTHER_RANK, True)
        session.notify_done(ROOM, "p1", False, ROOT)
        with caplog.at_level(logging.WARNING, logger="kvbridge"):
            step = session.step()
            assert session.step().late_causes == ()
        assert step.late_causes == (LateCause(ROOM, ROOT),)
        assert seen.causes == [(Role.DECODE, ROOM, ROOT)]
        assert [r.getMessage() for r in caplog.records if str(ROOM) in r.getMessage()] == [
            f"decode room {ROOM} (aborted here as failed on another rank): root cause {ROOT}"
        ]
    finally:
        dmgr.close()
        pmgr.close()


def test_prefill_a_decode_root_cause_after_a_follow_ended_the_room_is_kept() -> None:
    session, sender, receiver = make_session(TransferConfig())
    try:
        session.add([PrefillRequest(ROOM)])
        session.on_decode_abort(ROOM, None, "d0")  # d0 only followed another decode rank
        (aborted,) = session.step().aborted
        assert aborted.from_other_rank
        session.on_decode_abort(ROOM, "decode d1: client disconnected", "d9")  # unregistered
        assert session.step().late_causes == ()
        session.on_decode_abort(ROOM, "decode d0: client disconnected", "d0")
        assert session.step().late_causes == (
            LateCause(ROOM, "decode aborted: decode d0: client disconnected"),
        )
        session.on_decode_abort(ROOM, "decode d0: again", "d0")
        assert session.step().late_causes == ()
    finally:
        sender.close()
        receiver.close()


def test_prefill_answers_a_followers_abort_with_its_own_root_cause() -> None:
    """Way (b): this rank failed the room before decode asked; a follower's abort gets the
    cause (it would otherwise wait for metadata that never comes)."""
    told: list[tuple[int, bool, str | None]] = []
    session, sender, receiver = make_session(TransferConfig())
    session.notify_decode = lambda room, peers, ok, reason: told.append((room, ok, reason))
    try:
        session.add([PrefillRequest(ROOM)])
        session.abort(ROOM, "request cancelled in the engine")
        (aborted,) = session.step().aborted
        assert not aborted.from_other_rank
        session.on_decode_abort(ROOM, None, "d0")
        session.step()
        assert told == [(ROOM, False, "request cancelled in the engine")]
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("follows", [True, False])
def test_decode_an_engine_abort_that_follows_another_rank_never_passes_for_a_root_cause(
    follows: bool,
) -> None:
    """kvbridge-sglang's case: SGLang's MIN failed a request on every TP rank; on a rank whose
    own room had not failed, the engine's abort only follows (``DecodeNode.abort(follows=)``)."""
    notices: list[AbortNotice] = []
    session, target, managers = _decode_session(notices)
    said = "failed on another decode TP rank"
    try:
        session.add([DecodeRequest(ROOM, 2)])
        session.step()  # resolved, metadata out
        session.abort(ROOM, said, follows=follows)
        (aborted,) = session.step().aborted
        if follows:
            assert (aborted.reason, aborted.from_other_rank) == (FROM_OTHER_RANK, True)
            assert notices == [AbortNotice(ROOM, None, target)]
            session.notify_done(ROOM, "p1", False, ROOT)  # the prefill names the root cause
            assert session.step().late_causes == (LateCause(ROOM, ROOT),)
        else:
            assert (aborted.reason, aborted.from_other_rank) == (said, False)
            assert notices == [AbortNotice(ROOM, said, target)]
    finally:
        for manager in managers:
            manager.close()


def test_decode_an_unresolved_rooms_abort_goes_to_every_prefill_rank_at_its_address() -> None:
    notices: list[AbortNotice] = []
    session, _, managers = _decode_session(notices)
    session.directory = _Unresolved()
    try:
        session.add([DecodeRequest(ROOM, 2, bootstrap_addr="10.0.0.9:8998")])
        session.step()
        session.abort(ROOM, "client gone")
        session.step()
        assert notices == [AbortNotice(ROOM, "client gone", None, "10.0.0.9:8998")]
    finally:
        for manager in managers:
            manager.close()


class _Unresolved:
    def resolve(self, requests):
        return {}


@pytest.mark.parametrize("added", [True, False])
def test_prefill_an_engine_abort_that_follows_another_rank_keeps_the_root_cause_open(
    added: bool,
) -> None:
    told: list[tuple[int, bool, str | None]] = []
    session, sender, receiver = make_session(TransferConfig())
    session.notify_decode = lambda room, peers, ok, reason: told.append((room, ok, reason))
    try:
        if added:
            session.add([PrefillRequest(ROOM)])
            session.abort(ROOM, "failed on another prefill TP rank", follows=True)
            (aborted,) = session.step().aborted
            assert (aborted.reason, aborted.from_other_rank) == (FROM_OTHER_RANK, True)
            session.on_decode_abort(ROOM, "decode d0: client disconnected", "d0")
            assert session.step().late_causes == (
                LateCause(ROOM, "decode aborted: decode d0: client disconnected"),
            )
        else:  # never added: a decode rank asking later hears "followed", not the text
            session.abort(ROOM, "failed on another prefill TP rank", follows=True)
            session.on_decode_abort(ROOM, None, "d0")
            session.step()
            assert told == []
    finally:
        sender.close()
        receiver.close()
