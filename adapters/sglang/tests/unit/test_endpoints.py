"""kvbridge-sglang's endpoints without SGLang: the calls SGLang's queues make, in their order,
on real kvbridge nodes (Fake transport, real bootstrap server and control channel), with
numpy buffers laid out as SGLang's KV pool and metadata buffers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbridge import TransferConfig
from kvbridge.bootstrap.server import BootstrapServer
from kvbridge.status import KVPoll
from kvbridge_sglang.config import AdapterConfig
from kvbridge_sglang.decode import DecodeEndpoint
from kvbridge_sglang.layout import MetadataRows, RankLayout, kv_layout_for, kv_regions
from kvbridge_sglang.prefill import PrefillEndpoint
from kvbridge_sglang.rooms import RoomError, check_room

LAYERS, TOKENS, HEADS, DIM, SLOTS = 2, 64, 2, 8, 4


class SGLangRank:
    """Buffers shaped as SGLang allocates them: per-layer K and V ``[tokens, heads, dim]``
    (page size 1) and metadata buffers (output ids, a float row, the bootstrap room)."""

    def __init__(self) -> None:
        self.kv = [np.zeros((TOKENS, HEADS, DIM), np.float32) for _ in range(2 * LAYERS)]
        self.meta = [
            np.zeros((SLOTS, 16), np.int32),
            np.zeros((SLOTS, 8), np.float32),
            np.zeros((SLOTS, 8), np.int64),  # bootstrap_room
        ]

    def regions(self) -> list:
        return kv_regions(
            [t.ctypes.data for t in self.kv],
            [t.nbytes for t in self.kv],
            [t[0].nbytes for t in self.kv],
            "cpu",
        )

    def layout(self) -> RankLayout:
        return RankLayout(0, 1, tuple(self.regions()), self.rows(), 1, "float32", "head_sharded")

    def rows(self) -> MetadataRows:
        return MetadataRows.from_kv_args(
            [m.ctypes.data for m in self.meta],
            [m.nbytes for m in self.meta],
            [m[0].nbytes for m in self.meta],
        )


def _config() -> AdapterConfig:
    return AdapterConfig(
        TransferConfig(
            transport="fake", bootstrap_timeout=10, waiting_timeout=10, heartbeat_interval=0.5
        )
    )


@pytest.fixture
def pair() -> Iterator[tuple[PrefillEndpoint, DecodeEndpoint, SGLangRank, SGLangRank, str]]:
    server = BootstrapServer("127.0.0.1", 0).start()
    p, d = SGLangRank(), SGLangRank()
    prefill = PrefillEndpoint(_config(), p.layout(), server.address)
    decode = DecodeEndpoint(_config(), d.layout())
    try:
        yield prefill, decode, p, d, server.address
    finally:
        decode.close()
        prefill.close()
        server.stop()


def _until(what: str, done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def _ready_room(pair, room: int, pages: np.ndarray, aux_index: int) -> tuple:
    """A room opened on both sides, decode's metadata out, prefill ready for its forward
    pass (what SGLang's bootstrap and ``init`` calls leave)."""
    prefill, decode, _p, _d, addr = pair
    sender = prefill.open_room(room, addr)
    receiver = decode.open_room(room, addr)
    receiver.status = KVPoll.WaitingForInput  # what KvbridgeKVReceiver.init does
    decode.send_metadata(receiver, pages, aux_index=aux_index)
    _until("prefill ready", lambda: prefill.poll(sender) == KVPoll.WaitingForInput)
    return sender, receiver


def test_a_request_flows_through_in_sglang_call_order(pair) -> None:
    prefill, decode, p, d, addr = pair
    room = 2**62 + 5
    sender = prefill.open_room(room, addr)
    _until("prefill info", lambda: decode.ensure_prefill_info(addr))
    assert decode.prefill_info_table[addr].dp_size == 1
    receiver = decode.open_room(room, addr)
    assert decode.poll(receiver) == KVPoll.Bootstrapping
    receiver.prefill_dp_rank = 0
    receiver.status = KVPoll.WaitingForInput  # what KvbridgeKVReceiver.init does
    src_pages, dst_pages = np.arange(3, 13), np.arange(40, 50)
    decode.send_metadata(receiver, dst_pages, aux_index=2)
    _until("prefill ready", lambda: prefill.poll(sender) == KVPoll.WaitingForInput)
    for i, layer in enumerate(p.kv):
        layer[src_pages] = np.arange(10 * HEADS * DIM).reshape(10, HEADS, DIM) + 1000 * i
    p.meta[0][1, 0], p.meta[1][1, 3], p.meta[2][1, 0] = 77, 0.5, room
    prefill.init(sender, num_pages=10, aux_index=1)
    prefill.send(sender, src_pages[:6])  # two chunks, as chunked prefill sends them
    assert prefill.poll(sender) == KVPoll.WaitingForInput
    prefill.send(sender, src_pages[6:])
    _until("decode success", lambda: decode.poll(receiver) == KVPoll.Success)
    for src, dst in zip(p.kv, d.kv):
        assert np.array_equal(src[src_pages], dst[dst_pages])
    assert d.meta[0][2, 0] == 77 and d.meta[1][2, 3] == 0.5 and d.meta[2][2, 0] == room
    _until("prefill success", lambda: prefill.poll(sender) == KVPoll.Success)
    decode.clear(receiver)
    prefill.clear(sender)
    assert decode.release_safe(room)


def test_decode_prefix_hit_gets_only_the_last_pages(pair) -> None:
    prefill, decode, p, d, _addr = pair
    room = 99
    sender, receiver = _ready_room(pair, room, np.arange(20, 24), 0)  # decode holds 6 of 10
    for layer in p.kv:
        layer[np.arange(10)] = np.arange(10)[:, None, None]
    p.meta[2][0, 0] = room
    prefill.init(sender, num_pages=10, aux_index=0)
    prefill.send(sender, np.arange(10))
    _until("decode success", lambda: decode.poll(receiver) == KVPoll.Success)
    assert [int(x) for x in d.kv[0][20:24, 0, 0]] == [6, 7, 8, 9]


def test_an_aborted_room_is_held_until_kvbridge_releases_it(pair) -> None:
    prefill, decode, _p, _d, addr = pair
    room = 1234
    sender, receiver = _ready_room(pair, room, np.arange(5), 3)
    decode.abort(receiver)
    assert decode.poll(receiver) == KVPoll.Failed
    assert "aborted in SGLang" in str(receiver.exception())
    _until("prefill told", lambda: prefill.poll(sender) == KVPoll.Failed)
    _until("released", lambda: decode.release_safe(room))
    decode.clear(receiver)
    # The room can be used again once released.
    again = decode.open_room(room, addr)
    assert again.status == KVPoll.Bootstrapping


def test_a_request_aborted_while_it_waits_for_memory_still_tells_the_prefill(pair) -> None:
    """SGLang aborts a request still in its pre-allocation queue (``init`` done, no memory
    yet, so no metadata went out): kvbridge never had it on decode, but the prefill holds
    the room and hears why now, not at its own bootstrap_timeout."""
    prefill, decode, _p, _d, addr = pair
    room = 4321
    sender = prefill.open_room(room, addr)
    _until("prefill info", lambda: decode.ensure_prefill_info(addr))
    receiver = decode.open_room(room, addr)
    receiver.prefill_dp_rank = 0
    receiver.status = KVPoll.WaitingForInput  # what KvbridgeKVReceiver.init does
    decode.abort(receiver)
    assert decode.release_safe(room)  # nothing of it was ever in kvbridge here
    decode.clear(receiver)
    _until("prefill told", lambda: prefill.poll(sender) == KVPoll.Failed)
    reason = str(sender.exception())
    assert "decode aborted" in reason and "aborted in SGLang" in reason, reason


def test_a_follower_that_sent_no_metadata_tells_the_prefill_it_only_followed(pair) -> None:
    prefill, decode, _p, _d, addr = pair
    room = 4322
    sender = prefill.open_room(room, addr)
    _until("prefill info", lambda: decode.ensure_prefill_info(addr))
    receiver = decode.open_room(room, addr)
    decode.follow_failure(receiver)  # SGLang's MIN said Failed: another rank's receiver did
    _until("prefill told", lambda: prefill.poll(sender) == KVPoll.Failed)
    reason = str(sender.exception())
    assert "another decode" in reason or "another rank" in reason, reason
    assert "bootstrap_timeout" not in reason, reason


def test_bad_and_duplicate_rooms_fail_alone(pair) -> None:
    prefill, decode, _p, _d, addr = pair
    for bad in ("12", 0, -1, 2**63, 1.5, True, None):
        state = decode.open_room(bad, addr)
        assert decode.poll(state) == KVPoll.Failed
        assert "bootstrap_room" in str(state.exception())
        assert prefill.poll(prefill.open_room(bad, addr)) == KVPoll.Failed
    first = decode.open_room(7, addr)
    second = decode.open_room(7, addr)
    assert decode.poll(second) == KVPoll.Failed and "already live" in str(second.exception())
    assert decode.poll(first) == KVPoll.Bootstrapping
    decode.clear(second)  # clearing the refused duplicate leaves the live room alone
    assert decode.open_room(7, addr).status == KVPoll.Failed


def test_the_first_request_to_a_new_prefill_does_not_wait_for_sglangs_retry(pair) -> None:
    """SGLang asks ``try_ensure_parallel_info`` again only a second after a False: the first
    call waits (up to ``lookup_wait``) for the bootstrap's answer so that request goes on."""
    _prefill, registered, _p, _d, addr = pair
    _until("prefill registered", lambda: registered.ensure_prefill_info(addr))
    # A generous wait keeps timing out of the test: it ends as soon as the answer is in.
    # The rank outlives the endpoint: the layout only carries addresses, and memory freed
    # early is handed to the next allocation (the Fake's own buffers), which then overlaps.
    rank = SGLangRank()
    decode = DecodeEndpoint(attrs.evolve(_config(), lookup_wait=5.0), rank.layout())
    try:
        assert decode.ensure_prefill_info(addr)
        assert decode.prefill_info_table[addr].dp_size == 1
    finally:
        decode.close()


def test_a_prefill_is_looked_up_once_per_decode_rank(pair, monkeypatch) -> None:
    """SGLang asks for the prefill's sizes before it makes a receiver; kvbridge's node takes
    that answer instead of asking the bootstrap server again when the request is added."""
    prefill, decode, p, _d, addr = pair
    directory = decode.node.directory
    asked: list[str] = []
    real_info = directory.client.info
    monkeypatch.setattr(directory.client, "info", lambda a: asked.append(a) or real_info(a))
    _until("prefill info", lambda: decode.ensure_prefill_info(addr))
    room = 61
    sender, receiver = _ready_room(pair, room, np.arange(4), 0)
    prefill.init(sender, num_pages=4, aux_index=0)
    p.meta[2][0, 0] = room
    prefill.send(sender, np.arange(4))
    _until("decode success", lambda: decode.poll(receiver) == KVPoll.Success)
    assert asked == []


@pytest.mark.parametrize("sizes", [{"dp_size": 0, "tp_size": 1}, {"dp_size": 1}, [1, 2]])
def test_a_bootstrap_answer_with_bad_sizes_is_no_prefill_info(
    pair, monkeypatch, sizes: object
) -> None:
    """SGLang divides the room by the prefill's dp_size: a size from the network is checked."""
    _prefill, decode, _p, _d, addr = pair
    answer = {"sizes": sizes, "ranks": []}
    monkeypatch.setattr(decode._client, "info", lambda a: answer)
    for _ in range(3):
        assert not decode.ensure_prefill_info(addr)
        _until("look-up done", lambda: not decode._lookups)
    assert addr not in decode.prefill_info_table


def test_a_prefill_that_never_registers_fails_the_lookup_not_the_process() -> None:
    rank = SGLangRank()
    decode = DecodeEndpoint(
        AdapterConfig(TransferConfig(transport="fake", bootstrap_http_timeout=0.5)),
        rank.layout(),
    )
    try:
        for _ in range(3):
            assert not decode.ensure_prefill_info("127.0.0.1:9")
            time.sleep(0.6)
        assert "127.0.0.1:9" not in decode.prefill_info_table
    finally:
        decode.close()


@given(st.integers(1, 2**63 - 1))
def test_every_63_bit_room_is_accepted(room: int) -> None:
    assert check_room(room) == room


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=2**63), st.text(), st.floats()))
def test_anything_else_is_refused(room: object) -> None:
    with pytest.raises(RoomError):
        check_room(room)


def test_layouts() -> None:
    assert kv_layout_for(is_mla=True, page_size=16) == "replicated"
    assert kv_layout_for(is_mla=False, page_size=1) == "head_sharded"
    assert kv_layout_for(is_mla=False, page_size=16) == "token_major"
    with pytest.raises(ValueError, match="differ or are empty"):
        kv_regions([1], [2, 3], [1], "cpu")


def test_metadata_rows_round_trip_and_refuse_bad_slots() -> None:
    a, b = SGLangRank(), SGLangRank()
    a.meta[0][3] = np.arange(16)
    a.meta[2][3, 0] = 42
    packed = np.zeros(a.rows().row_bytes, np.uint8)
    a.rows().pack(3, packed)
    b.rows().unpack(packed, 1)
    assert np.array_equal(b.meta[0][1], np.arange(16)) and b.meta[2][1, 0] == 42
    with pytest.raises(ValueError, match="out of range"):
        a.rows().pack(SLOTS, packed)
    with pytest.raises(ValueError, match="bytes"):
        b.rows().unpack(packed[:-1], 0)


def test_a_request_without_bootstrap_host_fails_with_the_reason(pair) -> None:
    from kvbridge_sglang.rooms import NO_BOOTSTRAP_HOST

    prefill, decode, _p, _d, _addr = pair
    assert decode.ensure_prefill_info(NO_BOOTSTRAP_HOST)  # SGLang gets as far as a receiver
    for state in (decode.open_room(5, NO_BOOTSTRAP_HOST), prefill.open_room(5, "None:8998")):
        assert state.status == KVPoll.Failed
        assert "no bootstrap_host" in str(state.exception())
    assert decode.open_room(5, "127.0.0.1:99999").status == KVPoll.Failed


def test_client_chosen_bootstrap_addresses_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request names its prefill: a client naming thousands must not grow the cache or
    the look-up threads without bound."""
    from kvbridge_sglang import decode as decode_module

    monkeypatch.setattr(decode_module, "MAX_PREFILLS", 8)
    rank = SGLangRank()
    endpoint = DecodeEndpoint(AdapterConfig(TransferConfig(transport="fake")), rank.layout())
    release = __import__("threading").Event()

    def info(addr: str) -> dict:
        release.wait(10)
        return {"sizes": {"dp_size": 1, "tp_size": 1}, "ranks": []}

    monkeypatch.setattr(endpoint._client, "info", info)
    try:
        for i in range(100):
            endpoint.ensure_prefill_info(f"10.0.0.{i}:1")
        assert len(endpoint._lookups) == decode_module.MAX_LOOKUPS
        release.set()
        _until("look-ups done", lambda: not endpoint._lookups)
        for i in range(100, 140):
            endpoint.ensure_prefill_info(f"10.0.0.{i}:1")
            _until("look-up done", lambda: not endpoint._lookups)
        assert len(endpoint.prefill_info_table) <= 8
        assert "<no bootstrap_host>:0" in endpoint.prefill_info_table
    finally:
        endpoint.close()


@pytest.mark.parametrize("follower", ["decode", "prefill"])
def test_a_rank_that_only_follows_sglangs_consensus_tells_the_other_side_so(
    pair, follower: str
) -> None:
    """SGLang fails a request on every TP rank once one rank's poll() said Failed, then asks
    each rank for failure_exception(). On a rank whose own room had not failed, that ends the
    room as a follower: the other side hears "followed", and the engine's text never passes
    for a root cause (decode's and prefill's ``follow_failure``)."""
    prefill, decode, _p, _d, _addr = pair
    room = 41
    sender, receiver = _ready_room(pair, room, np.arange(4), 1)
    if follower == "decode":
        decode.follow_failure(receiver)
        mine, theirs, other = receiver, sender, prefill
    else:
        prefill.follow_failure(sender)
        mine, theirs, other = sender, receiver, decode
    assert mine.from_other_rank and "another" in str(mine.exception())
    _until("the other side told", lambda: other.poll(theirs) == KVPoll.Failed)
    # It only followed: the other side says "failed on another rank", not our text.
    assert theirs.from_other_rank, theirs.reason
    assert "failed on another rank" in str(theirs.exception())
    _until("released", lambda: decode.release_safe(room))
    decode.clear(receiver)
    prefill.clear(sender)


def test_polls_alone_carry_a_request_through(pair) -> None:
    """With both driver threads stopped, SGLang's own poll() calls step the nodes: the
    request still flows through (kvbridge-sglang's nodes have no collective, so a step on
    SGLang's thread never waits for another rank)."""
    prefill, decode, p, d, addr = pair
    prefill.driver.close()
    decode.driver.close()
    room = 4242
    sender = prefill.open_room(room, addr)
    _until("prefill info", lambda: decode.ensure_prefill_info(addr))
    receiver = decode.open_room(room, addr)
    receiver.status = KVPoll.WaitingForInput
    decode.send_metadata(receiver, np.arange(8, 12), aux_index=1)

    def both_polled(want: KVPoll) -> Callable[[], bool]:
        return lambda: prefill.poll(sender) >= 0 and decode.poll(receiver) == want

    _until("prefill ready", lambda: decode.poll(receiver) >= 0 and prefill.poll(sender) == 2)
    for layer in p.kv:
        layer[np.arange(4)] = 3.0
    p.meta[2][0, 0] = room
    prefill.init(sender, num_pages=4, aux_index=0)
    prefill.send(sender, np.arange(4))
    _until("decode success", both_polled(KVPoll.Success))
    assert all(np.array_equal(layer[8:12], np.full_like(layer[8:12], 3.0)) for layer in d.kv)
    _until("prefill success", lambda: prefill.poll(sender) == KVPoll.Success)
    assert prefill.poll_steps > 0 and decode.poll_steps > 0


def test_a_failing_step_in_poll_fails_the_room_with_the_reason(pair) -> None:
    _prefill, decode, _p, _d, addr = pair
    decode.driver.close()
    receiver = decode.open_room(77, addr)

    def broken() -> bool:
        raise RuntimeError("injected step failure")

    decode._step = broken  # type: ignore[method-assign]
    time.sleep(0.01)  # past poll_interval since the driver's last step
    assert decode.poll(receiver) == KVPoll.Failed
    assert "injected step failure" in str(receiver.exception())
