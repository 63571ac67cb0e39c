"""PrefillSession behaviour that does not need several processes."""

from __future__ import annotations

import time

import numpy as np

from kvbridge import TransferConfig, Transport
from kvbridge.plugins import TransportRegistry
from kvbridge.queue import DecodeMetadata, DecodePeer, PrefillRequest, PrefillSession
from kvbridge.queue.collective import SingleRankReducer
from kvbridge.testing import RankBuffers
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
