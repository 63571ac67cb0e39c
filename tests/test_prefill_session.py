"""PrefillSession behaviour that does not need several processes."""

from __future__ import annotations

import logging
import time

import numpy as np

from kvbridge import TransferConfig, Transport
from kvbridge.protocol.plan import DecodeMetadata, DecodePeer
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.collective import SingleRankReducer
from kvbridge.runtime.prefill_session import PrefillSession
from kvbridge.testing import RankBuffers
from kvbridge.transport.loading import TransportRegistry
from kvbridge.types import RankIdentity, Role


def make_session(config: TransferConfig, clock=time.monotonic):
    transport = Transport(TransportRegistry.discover().get("fake"))
    prefill, decode = RankBuffers.allocate(), RankBuffers.allocate()
    sender = transport.create_manager(
        config, RankIdentity(Role.PREFILL), prefill.kv_regions, prefill.aux_regions
    )
    receiver = transport.create_manager(
        config, RankIdentity(Role.DECODE), decode.kv_regions, decode.aux_regions
    )
    session = PrefillSession(
        config=config,
        manager=sender,
        kv_regions=prefill.kv_regions,
        aux_regions=prefill.aux_regions,
        reducer=SingleRankReducer(),
        clock=clock,
    )
    session.register_decode_peer(
        "d0", DecodePeer(receiver.endpoint, decode.kv_regions, decode.aux_regions)
    )
    return session, sender, receiver


def test_metadata_that_arrives_before_the_request_is_kept() -> None:
    session, sender, receiver = make_session(TransferConfig())
    try:
        receiver.receiver_construct(5)
        # The router told decode first: its metadata lands before prefill knows the room.
        session.on_metadata(DecodeMetadata(5, "d0", np.array([1, 2]), 0))
        assert session.step().ready == ()
        session.add([PrefillRequest(5)])
        assert session.step().ready == (5,)
    finally:
        sender.close()
        receiver.close()


def test_an_early_abort_is_kept_too() -> None:
    session, sender, receiver = make_session(TransferConfig())
    try:
        session.on_decode_abort(6, "decode gave up")
        session.step()
        session.add([PrefillRequest(6)])
        (aborted,) = session.step().aborted
        assert aborted.room == 6 and "decode gave up" in aborted.reason
    finally:
        sender.close()
        receiver.close()


def test_an_engine_abort_before_the_room_was_added_reaches_decode_at_once() -> None:
    """A router sent both legs at once and prefill's client went away before its KV was ready:
    the engine aborts a room it never added. Decode ranks that already asked are told the
    cause now, one that asks later at once, instead of waiting for bootstrap_timeout."""
    session, sender, receiver = make_session(TransferConfig())
    told: list[tuple[int, bool, str | None]] = []
    session.notify_decode = lambda room, peers, ok, reason: told.append((room, ok, reason))
    try:
        receiver.receiver_construct(7)
        session.on_metadata(DecodeMetadata(7, "d0", np.array([1, 2]), 0))
        session.step()
        session.abort(7, "client gone")
        assert told == [(7, False, "client gone")]
        assert session.pending_early() == 0
        session.on_metadata(DecodeMetadata(8, "d0", np.array([3]), 0))
        session.abort(8, "client gone too")  # before its metadata was even applied
        session.step()
        assert told[-1] == (8, False, "client gone too")
        session.abort(9, "never asked")
        session.on_metadata(DecodeMetadata(9, "d0", np.array([4]), 0))
        session.step()
        assert told[-1] == (9, False, "never asked")
        assert session.step().ready == ()
        # A later life of the number is a new room: its metadata is taken, not answered.
        session.add([PrefillRequest(9)])
        session.on_metadata(DecodeMetadata(9, "d0", np.array([4]), 0))
        assert session.step().ready == (9,)
        assert len(told) == 3
    finally:
        sender.close()
        receiver.close()


def test_early_messages_for_rooms_that_never_come_are_dropped_after_the_timeout() -> None:
    now = [0.0]
    session, sender, receiver = make_session(
        TransferConfig(bootstrap_timeout=5), clock=lambda: now[0]
    )
    try:
        session.on_metadata(DecodeMetadata(7, "d0", np.array([1]), 0))
        session.step()
        assert session.pending_early() == 1
        now[0] = 10.0
        session.step()
        assert session.pending_early() == 0
    finally:
        sender.close()
        receiver.close()


FLOOD = 50_000


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_forged_aborts_from_unregistered_senders_are_not_kept_and_log_a_handful(caplog) -> None:
    """Without a secret anyone can send Abort frames: from a sender that never registered
    they are counted and dropped, not kept for ``bootstrap_timeout``, and the log gets the
    first one and a periodic summary, not one line each. A real early abort still works."""
    now = [0.0]
    session, sender, receiver = make_session(TransferConfig(), clock=lambda: now[0])
    try:
        with caplog.at_level(logging.WARNING, logger="kvbridge"):
            session.on_decode_abort(6, "decode gave up", "d0")  # the room's real decode rank
            for i in range(FLOOD):
                session.on_decode_abort(1_000_000 + i, "forged", f"attacker{i % 7}")
            session.step()
            assert session.pending_early() == 1  # only the real one waits for add()
            assert session.untrusted == FLOOD
            assert len(_warnings(caplog)) <= 3
            now[0] += 60.0  # the summary names how many more were dropped
            session.step()
        assert any(str(FLOOD - 1) in w for w in _warnings(caplog)), _warnings(caplog)
        assert len(_warnings(caplog)) <= 4
        session.add([PrefillRequest(6)])
        (aborted,) = session.step().aborted
        assert aborted.room == 6 and "decode gave up" in aborted.reason
    finally:
        sender.close()
        receiver.close()


def test_early_messages_from_a_registered_sender_are_bounded_and_spare_the_others(
    caplog,
) -> None:
    """A registered decode rank (or one forged without a secret) cannot grow the early store
    past its cap: its own oldest rooms are evicted and counted, another rank's early abort
    stays, and expiry logs a summary, not a line per room."""
    now = [0.0]
    session, sender, receiver = make_session(
        TransferConfig(bootstrap_timeout=5), clock=lambda: now[0]
    )
    try:
        session.register_decode_peer("flooder", session_peer(receiver))
        with caplog.at_level(logging.WARNING, logger="kvbridge"):
            session.on_decode_abort(6, "decode gave up", "d0")
            for i in range(FLOOD):
                session.on_decode_abort(1_000_000 + i, "forged", "flooder")
                session.on_decode_abort(1_000_000 + i, "forged again", "flooder")
            session.step()
            assert session.pending_early() < FLOOD // 2
            limit = session.rooms.early.capacity
            assert session.pending_early() == limit
            assert session.rooms.early.evicted == FLOOD + 1 - limit
            session.add([PrefillRequest(6)])
            (aborted,) = session.step().aborted
            assert aborted.room == 6 and "decode gave up" in aborted.reason
            now[0] += 10.0  # past bootstrap_timeout: everything left expires
            session.step()
            assert session.pending_early() == 0
        assert len(_warnings(caplog)) <= 6, _warnings(caplog)[:10]
    finally:
        sender.close()
        receiver.close()


def session_peer(receiver) -> DecodePeer:
    return DecodePeer(receiver.endpoint, (), ())
