"""Control frames are taken off the socket by the node's own step, not by a thread per frame.

A node drains its receiver at the start of every step (the sessions read messages only in a
step), so no thread wakes to hand each frame over. The receiver's background thread drains
only when its owner has not for ``idle_drain`` seconds. Whoever drains, every message arrives
exactly once and in order.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from integrity_rig import Decode

from kvbridge import TransferConfig
from kvbridge.protocol.messages import Heartbeat, Message, Status
from kvbridge.runtime.control import ControlReceiver, ControlSender


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        with self.lock:
            self.messages.append(message)
            self.threads.add(threading.current_thread().name)

    def wait_for(self, count: int, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} arrived"
            time.sleep(0.005)


def test_an_owner_that_drains_takes_every_frame_on_its_own_thread() -> None:
    inbox = Inbox()
    receiver = ControlReceiver(inbox, idle_drain=5.0)
    sender = ControlSender()
    try:
        for room in range(1, 51):
            sender.send(receiver.address, Status(room, "p", True))
        deadline = time.monotonic() + 30
        while len(inbox.messages) < 50:
            assert time.monotonic() < deadline
            receiver.drain()
            time.sleep(0.001)
        assert [m.room for m in inbox.messages] == list(range(1, 51))  # type: ignore[attr-defined]
        assert inbox.threads == {threading.current_thread().name}
        assert receiver.background_drains == 0
        assert receiver.owner_drains >= 1
        assert receiver.drain() == 0  # nothing left, and an empty drain does not wait
    finally:
        sender.close()
        receiver.close()


def test_without_an_owner_draining_the_background_thread_delivers() -> None:
    inbox = Inbox()
    receiver = ControlReceiver(inbox, idle_drain=0.02)
    sender = ControlSender()
    try:
        sender.send(receiver.address, Heartbeat("p"))
        inbox.wait_for(1)
        assert inbox.threads == {f"kvbridge-control-{receiver.address.rsplit(':', 1)[1]}"}
        assert receiver.background_drains >= 1
    finally:
        sender.close()
        receiver.close()


def test_every_message_arrives_once_and_in_order_whoever_drains() -> None:
    """The owner drains at random moments, sometimes pausing past ``idle_drain`` so the
    background thread takes over, while a peer keeps sending."""
    inbox = Inbox()
    receiver = ControlReceiver(inbox, idle_drain=0.005)
    sender = ControlSender()
    count = 3000
    rng = random.Random(7)

    def send_all() -> None:
        for room in range(1, count + 1):
            sender.send(receiver.address, Status(room, "p", True))
            if room % 100 == 0:
                time.sleep(0.002)

    peer = threading.Thread(target=send_all)
    peer.start()
    try:
        deadline = time.monotonic() + 60
        while len(inbox.messages) < count:
            assert time.monotonic() < deadline, f"{len(inbox.messages)} of {count} arrived"
            receiver.drain()
            time.sleep(rng.choice((0.0, 0.001, 0.02)))
        peer.join()
        time.sleep(0.05)
        receiver.drain()
        assert [m.room for m in inbox.messages] == list(range(1, count + 1))  # type: ignore[attr-defined]
        assert receiver.owner_drains and receiver.background_drains  # both took part
    finally:
        peer.join()
        sender.close()
        receiver.close()


def test_a_step_drains_what_peers_sent() -> None:
    """A node that steps takes its frames on the stepping thread."""
    config = TransferConfig(transport="fake", waiting_timeout=30.0)
    decode_rank = Decode(config, 8)
    sender = ControlSender()
    try:
        control = decode_rank.node.control
        sender.send(control.address, Heartbeat("prefill-x"))
        deadline = time.monotonic() + 30
        while control.received == 0:
            assert time.monotonic() < deadline
            decode_rank.step()
            time.sleep(0.002)
        assert control.owner_drains >= 1
    finally:
        sender.close()
        decode_rank.close()


@pytest.mark.parametrize("idle_drain", [0, -1, 61, float("nan")])
def test_a_nonsensical_idle_drain_is_refused(idle_drain: float) -> None:
    with pytest.raises(ValueError, match="idle_drain"):
        ControlReceiver(lambda m: None, idle_drain=idle_drain)
