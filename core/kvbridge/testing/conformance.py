"""The conformance kit: abstract tests every transport must pass.

Subclass :class:`TransportConformance` in your plugin's test suite and set ``transport_name``;
override the ``transport_options`` fixture when your transport needs options (the default,
``{}``, runs every transport on its own defaults)::

    import pytest
    from kvbridge.testing import TransportConformance

    class TestMyTransport(TransportConformance):
        transport_name = "mytransport"

        @pytest.fixture
        def transport_options(self):
            return {"backend": "TCP"}

The kit loads the transport through the installed entry point (the same path an engine uses)
and calls it only through the core's dispatch. A ``transport_name`` that no installed package
provides fails every test (a typo must not pass as "skipped"); a transport that is installed
but does not load (its native library is missing) is skipped with the reason, or fails where
``KVBRIDGE_REQUIRE_TRANSPORTS`` names it. Every failure message starts with the rule it broke.

Capabilities a transport declares in ``TransportInfo.capabilities`` switch tests on, or say
which promise is tested:

- ``cross_process``: bytes move between processes (tests spawn a receiver process);
- ``rejects_unregistered_memory``: a write to unregistered *destination* memory fails the room
  (every transport must reject unregistered *source* memory);
- ``one_sided_writes``: the receiver cannot refuse a write (RDMA). Without it, the kit checks
  that no byte lands after ``receiver_abort`` or ``receiver_clear``, nor for a room the receiver
  never constructed. With it, the kit checks the sender's half of the abort fence instead:
  once ``kvbridge_sender_drained`` reports an aborted room drained, no byte of it lands.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest

from kvbridge.config import TransferConfig
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.status import KVPoll
from kvbridge.testing.remote import RemoteReceiver
from kvbridge.testing.rig import TransferRig, TransportHang, require_transport, wait_until_terminal
from kvbridge.transport.facade import Transport
from kvbridge.types import Descriptors, MemoryRegion, PeerWrite, RankIdentity, Role, SendChunk


def _pages(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _expect_terminal(
    poll: Callable[[np.ndarray], Any], room: int, want: KVPoll, rule: str, timeout: float
) -> str | None:
    """Wait until ``room`` is terminal; fail naming ``rule`` unless it ended in ``want``."""
    try:
        status, reason = wait_until_terminal(poll, room, timeout)
    except TransportHang as exc:
        pytest.fail(f"[{rule}] expected {want.name} within {timeout}s, but {exc}")
    if status != want:
        pytest.fail(f"[{rule}] expected {want.name}, got {status.name} ({reason or 'no reason'})")
    return reason


def _watch_stamp(
    buffers: Any, room: int, slot: int, done: threading.Event, seen: list[list[np.ndarray]]
) -> None:
    """Copy the destination KV the moment ``room``'s stamp appears in aux row ``slot``."""
    stamps = buffers.stamps
    while not done.is_set():
        if int(stamps[slot]) == room:
            seen.append([region.copy() for region in buffers.kv])
            return
        time.sleep(0)


def _snapshot(buffers: Any) -> list[np.ndarray]:
    return [region.copy() for region in buffers.kv] + [buffers.aux.copy()]


def _changed(before: list[np.ndarray], buffers: Any) -> list[str]:
    now = [*buffers.kv, buffers.aux]
    where = [f"KV region {i}" for i in range(len(buffers.kv))] + ["aux rows"]
    return [w for w, a, b in zip(where, before, now) if not np.array_equal(a, b)]


class TransportConformance:
    """Abstract conformance tests; a subclass names the transport under test."""

    transport_name: ClassVar[str] = ""
    #: Seconds a transfer may take before the kit calls it a hang.
    timeout: ClassVar[float] = 30.0
    #: Seconds a refused write (or an aborted room) may take to be reported Failed / drained.
    refusal_timeout: ClassVar[float] = 10.0
    #: Seconds the kit watches destination memory for bytes that must not land.
    watch_seconds: ClassVar[float] = 0.5
    page_bytes: ClassVar[int] = 4096
    num_pages: ClassVar[int] = 64

    @pytest.fixture
    def transport_options(self) -> dict[str, Any]:
        """The transport's options for every test; override it in your subclass."""
        return {}

    @pytest.fixture
    def transport(self) -> Transport:
        if not self.transport_name:
            pytest.fail("set transport_name on your TransportConformance subclass")
        return Transport(require_transport(self.transport_name))

    @pytest.fixture
    def config(self, transport_options: dict[str, Any]) -> TransferConfig:
        if not isinstance(transport_options, dict):
            pytest.fail(
                "transport_options must be a fixture returning a dict (a class attribute "
                "named transport_options hides the kit's fixture)"
            )
        return TransferConfig(transport=self.transport_name, transport_options=transport_options)

    @pytest.fixture
    def rig(self, transport: Transport, config: TransferConfig) -> Iterator[TransferRig]:
        rig = TransferRig(transport, config, num_pages=self.num_pages, page_bytes=self.page_bytes)
        yield rig
        rig.close()

    def needs(self, transport: Transport, capability: str) -> None:
        if capability not in transport.info.capabilities:
            pytest.skip(f"transport {transport.name!r} does not declare {capability!r}")

    # -- identity ------------------------------------------------------------------------------

    def test_info_names_the_transport(self, transport: Transport) -> None:
        assert transport.info.name == self.transport_name
        major = transport.info.api_version.split(".")[0]
        assert major.isdigit()

    def test_endpoint_is_json_safe(self, rig: TransferRig) -> None:
        for manager in (rig.sender, rig.receiver):
            endpoint = manager.endpoint
            assert json.loads(json.dumps(dict(endpoint))) == dict(endpoint)

    # -- data ----------------------------------------------------------------------------------

    def test_bytes_arrive_intact(self, rig: TransferRig) -> None:
        room, src, dst = 11, _pages(0, 1, 2, 3, 8, 9, 30), _pages(40, 41, 5, 6, 7, 20, 63)
        rig.open(room, dst, dst_slot=3)
        rig.transfer(room, src, dst, src_slot=1, dst_slot=3)
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Success, reason
        assert rig.decode.mismatches(room, dst) == []
        assert rig.decode.aux_matches(3, room)
        untouched = np.setdiff1d(np.arange(self.num_pages), dst)
        assert all(not region[untouched].any() for region in rig.decode.kv)

    def test_many_chunks_land_in_order(self, rig: TransferRig) -> None:
        room = 12
        src = np.arange(32, dtype=np.int64)
        dst = np.random.default_rng(0).permutation(self.num_pages)[:32].astype(np.int64)
        rig.open(room, dst, dst_slot=0)
        rig.transfer(room, src, dst, src_slot=0, dst_slot=0, chunks=4)
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Success, reason
        assert rig.decode.mismatches(room, dst) == []
        assert rig.decode.aux_matches(0, room)

    def test_zero_page_last_chunk_still_carries_aux(self, rig: TransferRig) -> None:
        room = 13
        rig.open(room, _pages(), dst_slot=5)
        rig.prefill.write_aux(2, room)
        rig.sender.sender_send(room, rig.chunk(_pages(), _pages(), last_slots=(2, 5)))
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Success, reason
        assert rig.decode.aux_matches(5, room)

    def test_a_chunk_of_thousands_of_unmerged_runs_arrives_intact(
        self, transport: Transport, config: TransferConfig
    ) -> None:
        """Native batch APIs have queue limits; a big shuffled chunk must still land."""
        rig = TransferRig(transport, config, num_pages=4096, page_bytes=512)
        try:
            room = 15
            src = np.arange(4096, dtype=np.int64)
            dst = np.random.default_rng(7).permutation(4096).astype(np.int64)
            rig.open(room, dst, dst_slot=2)
            rig.transfer(room, src, dst, src_slot=1, dst_slot=2)
            status, reason = rig.wait_sender(room, self.timeout * 4)
            assert status == KVPoll.Success, reason
            assert rig.decode.mismatches(room, dst) == []
            assert rig.decode.aux_matches(2, room)
        finally:
            rig.close()

    def test_last_chunk_without_any_write_succeeds(self, rig: TransferRig) -> None:
        """A rank that writes nothing for a room (it only takes part) still finishes it."""
        room = 14
        rig.open(room, _pages(), dst_slot=6)
        rig.sender.sender_send(room, SendChunk((), is_last=True))
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Success, reason

    def test_batched_poll_answers_every_room_in_order(self, rig: TransferRig) -> None:
        rooms = list(range(100, 116))
        for i, room in enumerate(rooms):
            rig.open(room, _pages(i), dst_slot=i)
        done = rooms[::2]
        for room in done:
            i = rooms.index(room)
            rig.transfer(room, _pages(i), _pages(i), src_slot=i, dst_slot=i)
        for room in done:
            assert rig.wait_sender(room, self.timeout)[0] == KVPoll.Success
        statuses, _ = rig.sender.sender_poll(np.array(rooms, dtype=np.uint64))
        assert len(statuses) == len(rooms)
        for room, status in zip(rooms, statuses.tolist()):
            expected = KVPoll.Success if room in done else KVPoll.WaitingForInput
            assert status == expected, (room, KVPoll(status))
        receiver_statuses, _ = rig.receiver.receiver_poll(np.array(rooms, dtype=np.uint64))
        assert len(receiver_statuses) == len(rooms)
        assert all(s != KVPoll.Failed for s in receiver_statuses.tolist())

    # -- lifecycle -----------------------------------------------------------------------------

    def test_statuses_only_move_forward(self, rig: TransferRig) -> None:
        room, pages = 21, _pages(1, 2, 3)
        rooms = np.array([room], dtype=np.uint64)
        history: list[int] = []

        def record() -> None:
            history.append(int(rig.sender.sender_poll(rooms)[0][0]))
            history.append(int(rig.receiver.receiver_poll(rooms)[0][0]) + 10)

        rig.receiver.receiver_construct(room)
        rig.sender.sender_construct(room)
        record()
        rig.receiver.receiver_init(room, (rig.sender.endpoint,))
        rig.sender.sender_init(room, (rig.receiver.endpoint,))
        record()
        rig.receiver.receiver_send_metadata(room, pages, 1)
        record()
        rig.transfer(room, pages, pages, src_slot=1, dst_slot=1)
        for _ in range(50):
            record()
        sender = [h for h in history if h < 10]
        receiver = [h - 10 for h in history if h >= 10]
        for seq in (sender, receiver):
            assert KVPoll.Failed not in seq, seq
            assert seq == sorted(seq), f"status went backwards: {[KVPoll(s).name for s in seq]}"
        assert sender[0] == KVPoll.Bootstrapping and receiver[0] == KVPoll.Bootstrapping

    @pytest.mark.parametrize("stage", ["constructed", "initialised", "metadata", "sent"])
    def test_abort_works_in_every_state_and_failed_is_sticky(
        self, rig: TransferRig, stage: str
    ) -> None:
        room, pages = 31, _pages(4, 5)
        rooms = np.array([room], dtype=np.uint64)
        rig.receiver.receiver_construct(room)
        rig.sender.sender_construct(room)
        if stage != "constructed":
            rig.receiver.receiver_init(room, (rig.sender.endpoint,))
            rig.sender.sender_init(room, (rig.receiver.endpoint,))
        if stage in ("metadata", "sent"):
            rig.receiver.receiver_send_metadata(room, pages, 2)
        if stage == "sent":
            rig.transfer(room, pages, pages, src_slot=2, dst_slot=2, chunks=2)
        rig.receiver.receiver_abort(room, "test abort")
        rig.sender.sender_abort(room, "test abort")
        first: dict[str, int] = {}
        for _ in range(20):
            for side, poll in (
                ("receiver", rig.receiver.receiver_poll),
                ("sender", rig.sender.sender_poll),
            ):
                statuses, failures = poll(rooms)
                status = int(statuses[0])
                first.setdefault(side, status)
                # Writes of a sent room may finish before the abort arrives: then Success (an
                # advisory one on the receiver) may stay. Either way the status never changes.
                allowed = (KVPoll.Failed, KVPoll.Success) if stage == "sent" else (KVPoll.Failed,)
                assert status in allowed, (
                    f"[abort fails the room] {side} of a room aborted when {stage} reports "
                    f"{KVPoll(status).name}"
                )
                assert status == first[side], (
                    f"[terminal statuses are sticky] {side} went from "
                    f"{KVPoll(first[side]).name} to {KVPoll(status).name} after the abort"
                )
                if status == KVPoll.Failed:
                    assert failures.get(room), "[a failed room comes with a reason]"
        rig.receiver.receiver_clear(room)
        rig.sender.sender_clear(room)

    def test_clear_twice_and_clear_unknown_are_harmless(self, rig: TransferRig) -> None:
        room, pages = 41, _pages(7)
        rig.open(room, pages, dst_slot=4)
        rig.transfer(room, pages, pages, src_slot=4, dst_slot=4)
        assert rig.wait_sender(room, self.timeout)[0] == KVPoll.Success
        for manager in (rig.receiver, rig.sender):
            for _ in range(2):
                manager.receiver_clear(room) if manager is rig.receiver else manager.sender_clear(
                    room
                )
        rig.receiver.receiver_clear(999_999)
        rig.sender.sender_clear(999_999)
        # The room id may be reused afterwards, starting from scratch.
        rig.open(room, pages, dst_slot=4)
        statuses, _ = rig.sender.sender_poll(np.array([room], dtype=np.uint64))
        assert statuses[0] == KVPoll.WaitingForInput

    def test_late_report_for_cleared_room_is_ignored(self, rig: TransferRig) -> None:
        room, other = 51, 52
        pages = np.arange(16, dtype=np.int64)
        rig.open(room, pages, dst_slot=6)
        rig.open(other, _pages(20), dst_slot=7)
        rig.transfer(room, pages, pages, src_slot=6, dst_slot=6, chunks=4)
        rig.sender.sender_abort(room, "cleared early")
        rig.receiver.receiver_abort(room, "cleared early")
        rig.sender.sender_clear(room)
        rig.receiver.receiver_clear(room)
        # Whatever the transport still had in flight for `room` must not surface anywhere.
        rig.transfer(other, _pages(20), _pages(20), src_slot=7, dst_slot=7)
        assert rig.wait_sender(other, self.timeout)[0] == KVPoll.Success
        rig.sender.sender_construct(room)
        rig.receiver.receiver_construct(room)
        rooms = np.array([room, other], dtype=np.uint64)
        for _ in range(20):
            s_status, _ = rig.sender.sender_poll(rooms)
            r_status, _ = rig.receiver.receiver_poll(rooms)
            assert s_status[0] == KVPoll.Bootstrapping and r_status[0] == KVPoll.Bootstrapping
            assert s_status[1] == KVPoll.Success

    # -- refusal -------------------------------------------------------------------------------

    def test_unregistered_source_memory_is_rejected(self, rig: TransferRig) -> None:
        room = 61
        rig.open(room, _pages(1), dst_slot=1)
        stray = np.zeros(rig.prefill.page_bytes, dtype=np.uint8)
        fake_src = MemoryRegion.of(stray)
        bad = Descriptors(
            np.array([fake_src.addr], dtype=np.int64),
            np.array([rig.decode.kv_regions[0].addr], dtype=np.int64),
            np.array([fake_src.length], dtype=np.int64),
        )
        rig.sender.sender_send(room, SendChunk((PeerWrite(0, bad),), is_last=True))
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Failed and reason
        assert not rig.decode.kv[0].any(), "bytes from unregistered memory landed"

    def test_unregistered_destination_memory_is_rejected(
        self, rig: TransferRig, transport: Transport
    ) -> None:
        self.needs(transport, "rejects_unregistered_memory")
        room = 62
        rig.open(room, _pages(1), dst_slot=1)
        stray = np.zeros((1, rig.prefill.page_bytes), dtype=np.uint8)
        rig.prefill.fill(room, _pages(0))
        chunk = rig.chunk(_pages(0), _pages(0), dst_kv=(MemoryRegion.of(stray),) * 4)
        rig.sender.sender_send(room, chunk)
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Failed and reason
        assert not stray.any()

    def test_an_unknown_option_is_an_error_naming_it(
        self, transport: Transport, config: TransferConfig
    ) -> None:
        """A misspelt option is an error, never ignored (``transport_kit.transport_options``)."""
        rig_buffers = np.zeros((4, 64), dtype=np.uint8)
        region = MemoryRegion.of(rig_buffers, 64)
        options = {**config.transport_options, "kvbridge_kit_no_such_option": 1}
        bad = TransferConfig(transport=config.transport, transport_options=options)
        try:
            manager = transport.create_manager(bad, RankIdentity(Role.DECODE), (region,), ())
        except Exception as exc:
            assert "kvbridge_kit_no_such_option" in str(exc), (
                f"[unknown options are errors naming them] the error does not name it: {exc}"
            )
            return
        manager.close()
        pytest.fail(
            "[unknown options are errors naming them] a manager was created with the unknown "
            "option 'kvbridge_kit_no_such_option'"
        )

    # -- writes that must not land -------------------------------------------------------------

    def _refuses(self, transport: Transport) -> None:
        if "one_sided_writes" in transport.info.capabilities:
            pytest.skip(
                f"transport {transport.name!r} declares 'one_sided_writes': its receiver cannot "
                "refuse writes; the kit checks the sender's abort fence instead"
            )

    def _send_unwanted(self, rig: TransferRig, room: int, rule: str) -> None:
        """Send a room's KV and aux row; the receiver must refuse them: nothing lands."""
        pages = _pages(3, 4, 5, 6)
        before = _snapshot(rig.decode)
        rig.transfer(room, pages, pages, src_slot=2, dst_slot=2, chunks=2)
        _expect_terminal(rig.sender.sender_poll, room, KVPoll.Failed, rule, self.refusal_timeout)
        deadline = time.monotonic() + self.watch_seconds
        while time.monotonic() < deadline:
            changed = _changed(before, rig.decode)
            assert not changed, f"[{rule}] bytes landed in {', '.join(changed)}"
            time.sleep(0.01)

    def test_no_write_lands_after_receiver_abort(
        self, rig: TransferRig, transport: Transport
    ) -> None:
        self._refuses(transport)
        room = 91
        rig.open(room, _pages(3, 4, 5, 6), dst_slot=2)
        rig.receiver.receiver_abort(room, "kit: decode gave up")
        self._send_unwanted(rig, room, "no write lands after receiver_abort")

    def test_no_write_lands_after_receiver_clear(
        self, rig: TransferRig, transport: Transport
    ) -> None:
        self._refuses(transport)
        room = 92
        rig.open(room, _pages(3, 4, 5, 6), dst_slot=2)
        rig.receiver.receiver_clear(room)  # the pages may belong to another request now
        self._send_unwanted(rig, room, "no write lands after receiver_clear")

    def test_no_write_lands_for_a_room_the_receiver_never_constructed(
        self, rig: TransferRig, transport: Transport
    ) -> None:
        self._refuses(transport)
        room = 93
        rig.sender.sender_construct(room)
        rig.sender.sender_init(room, (rig.receiver.endpoint,))
        self._send_unwanted(rig, room, "no write lands for a room the receiver never constructed")

    def test_no_write_lands_once_an_aborted_room_is_drained(
        self, rig: TransferRig, transport: Transport
    ) -> None:
        """The sender's half of the abort fence (API 1.1): after ``sender_abort`` no write of
        the room starts, and once ``kvbridge_sender_drained`` says so, no byte of it lands."""
        rule = "no write lands once sender_drained reports the aborted room"
        hook = rig.sender._hook.kvbridge_sender_drained
        if not hook.get_hookimpls():
            if "one_sided_writes" in transport.info.capabilities:
                pytest.fail(
                    f"[{rule}] the transport declares 'one_sided_writes' but does not implement "
                    "kvbridge_sender_drained: nothing protects reused decode memory"
                )
            pytest.skip("no kvbridge_sender_drained hook (a plugin for API 1.0)")
        room = 94
        pages = np.arange(32, dtype=np.int64)
        rig.open(room, pages, dst_slot=3)
        rig.prefill.fill(room, pages[:16])
        for first in range(0, 16, 4):  # KV chunks, none of them the last: the room stays open
            chunk = pages[first : first + 4]
            rig.sender.sender_send(room, rig.chunk(chunk, chunk))
        time.sleep(0.05)  # let the transport hand the writes to its library
        rig.sender.sender_abort(room, "kit: abort while writing")
        # A chunk sent after the abort must never be written (it targets untouched pages).
        rig.prefill.fill(room, pages[16:])
        rig.prefill.write_aux(3, room)
        rig.sender.sender_send(room, rig.chunk(pages[16:], pages[16:], last_slots=(3, 3)))
        rooms = np.array([room], dtype=np.uint64)
        deadline = time.monotonic() + self.refusal_timeout
        while True:
            drained = np.asarray(hook(manager=rig.sender.raw, rooms=rooms), dtype=bool)
            assert drained.shape == (1,), f"[{rule}] sender_drained returned {drained!r}"
            if drained[0]:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"[{rule}] room {room} not drained {self.refusal_timeout}s after abort")
            time.sleep(0.005)
        before = _snapshot(rig.decode)
        deadline = time.monotonic() + self.watch_seconds
        while time.monotonic() < deadline:
            drained = np.asarray(hook(manager=rig.sender.raw, rooms=rooms), dtype=bool)
            assert drained[0], f"[{rule}] sender_drained went back from True to False"
            changed = _changed(before, rig.decode)
            assert not changed, f"[{rule}] bytes landed in {', '.join(changed)} after drained"
            time.sleep(0.01)
        untouched = pages[16:]
        assert all(not region[untouched].any() for region in rig.decode.kv), (
            f"[{rule}] a chunk sent after sender_abort was written"
        )
        status, _ = rig.sender.sender_poll(rooms)
        assert status[0] == KVPoll.Failed, (
            f"[abort fails the room] sender reports {KVPoll(int(status[0])).name}"
        )
        rig.sender.sender_clear(room)

    # -- order ---------------------------------------------------------------------------------

    def test_aux_row_lands_after_the_kv_pages(
        self, transport: Transport, config: TransferConfig
    ) -> None:
        """Decode commits a room when its aux stamp is there: the pages must already be.

        A watcher thread reads the destination while the transfer runs; when the room stamp
        appears it checks every page. Several rooms of thousands of runs each give a transport
        that writes the aux row first many chances to be seen.
        """
        rule = "the aux row lands after the KV pages of its chunk"
        rig = TransferRig(transport, config, num_pages=2048, page_bytes=512)
        try:
            rng = np.random.default_rng(3)
            for attempt, room in enumerate(range(301, 305)):
                src = np.arange(2048, dtype=np.int64)
                dst = rng.permutation(2048).astype(np.int64)
                slot = attempt % 4
                rig.open(room, dst, dst_slot=slot)
                seen: list[list[np.ndarray]] = []
                done = threading.Event()
                watcher = threading.Thread(
                    target=_watch_stamp,
                    args=(rig.decode, room, slot, done, seen),
                    daemon=True,
                )
                watcher.start()
                rig.transfer(room, src, dst, src_slot=1, dst_slot=slot)
                _expect_terminal(
                    rig.sender.sender_poll, room, KVPoll.Success, rule, self.timeout * 4
                )
                done.set()
                watcher.join(10)
                if seen:
                    at_stamp = attrs.evolve(rig.decode, kv=seen[0])
                    missing = at_stamp.mismatches(room, dst)
                    if missing:
                        pytest.fail(
                            f"[{rule}] room {room}'s stamp landed while {len(missing)} KV pages "
                            f"were still missing (first: {missing[0]})"
                        )
                rig.sender.sender_clear(room)
                rig.receiver.receiver_clear(room)
                rig.decode.stamps[slot] = 0
        finally:
            rig.close()

    # -- vanished peers ------------------------------------------------------------------------

    def test_vanished_peer_gives_failed_not_a_hang(self, rig: TransferRig) -> None:
        room, pages = 71, _pages(1, 2)
        rig.open(room, pages, dst_slot=1)
        rig.receiver.close()
        rig.transfer(room, pages, pages, src_slot=1, dst_slot=1)
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Failed and reason

    @pytest.fixture
    def remote(self, transport: Transport, config: TransferConfig) -> Iterator[RemoteReceiver]:
        """A receiver manager in another process (needs the ``cross_process`` capability)."""
        self.needs(transport, "cross_process")
        receiver = RemoteReceiver(
            self.transport_name,
            dict(config.transport_options),
            num_pages=self.num_pages,
            page_bytes=self.page_bytes,
        )
        yield receiver
        receiver.close()

    @staticmethod
    def _send_to(
        rig: TransferRig, remote: RemoteReceiver, room: int, pages: np.ndarray, slot: int
    ) -> None:
        remote.open(room, rig.sender.endpoint, pages, slot)
        rig.sender.sender_construct(room)
        rig.sender.sender_init(room, (remote.endpoint,))

    def test_bytes_cross_a_process_boundary(self, rig: TransferRig, remote: RemoteReceiver) -> None:
        room = 81
        src, dst = np.arange(8, dtype=np.int64), _pages(50, 51, 52, 3, 9, 10, 11, 60)
        self._send_to(rig, remote, room, dst, 9)
        rig.prefill.fill(room, src)
        rig.prefill.write_aux(0, room)
        d = Descriptors.concat(
            [
                kv_descriptors(rig.prefill.kv_regions, remote.kv_regions, src, dst),
                aux_descriptors(rig.prefill.aux_regions, remote.aux_regions, 0, 9),
            ]
        )
        rig.sender.sender_send(room, SendChunk((PeerWrite(0, d),), is_last=True))
        status, reason = rig.wait_sender(room, self.timeout)
        assert status == KVPoll.Success, reason
        mismatches, aux_ok = remote.verify(room, dst, 9)
        assert mismatches == [] and aux_ok

    def test_killed_peer_process_gives_failed(
        self, rig: TransferRig, remote: RemoteReceiver
    ) -> None:
        room, pages = 82, np.arange(16, dtype=np.int64)
        self._send_to(rig, remote, room, pages, 1)
        first = kv_descriptors(rig.prefill.kv_regions, remote.kv_regions, pages[:8], pages[:8])
        rig.sender.sender_send(room, SendChunk((PeerWrite(0, first),), is_last=False))
        remote.kill()
        rest = kv_descriptors(rig.prefill.kv_regions, remote.kv_regions, pages[8:], pages[8:])
        rig.sender.sender_send(room, SendChunk((PeerWrite(0, rest),), is_last=True))
        status, reason = wait_until_terminal(rig.sender.sender_poll, room, self.timeout)
        assert status == KVPoll.Failed and reason
