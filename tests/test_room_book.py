"""The kit's RoomBook answers a poll of unchanged rooms from its last answer: every change of a
status, of the rooms, or the end of an init delay must show in the next poll."""

from __future__ import annotations

import time

import numpy as np

from kvbridge.status import KVPoll
from kvbridge.transport.kit.book import RoomBook
from kvbridge.types import Descriptors, PeerWrite, SendChunk


def _poll(book: RoomBook, *rooms: int) -> list[int]:
    return np.asarray(book.poll(np.array(rooms, dtype=np.uint64)).statuses).tolist()


def test_every_change_shows_in_the_next_poll_of_the_same_rooms() -> None:
    book = RoomBook("test")
    book.construct(1)
    book.construct(2)
    assert _poll(book, 1, 2) == [KVPoll.Bootstrapping] * 2
    book.init(1, ({"peer": 0},))
    assert _poll(book, 1, 2) == [KVPoll.WaitingForInput, KVPoll.Bootstrapping]
    book.advance(2, KVPoll.Transferring)
    assert _poll(book, 1, 2) == [KVPoll.WaitingForInput, KVPoll.Transferring]
    chunk = SendChunk((PeerWrite(0, Descriptors.empty()),), is_last=True)
    state = book.start_send(1, chunk, jobs=1)
    assert state is not None
    assert _poll(book, 1, 2) == [KVPoll.Transferring] * 2
    book.finish_job(state, None, is_last=True)  # a worker thread, in a transport
    assert _poll(book, 1, 2) == [KVPoll.Success, KVPoll.Transferring]
    book.fail(2, "peer gone")
    result = book.poll(np.array([1, 2], dtype=np.uint64))
    assert np.asarray(result.statuses).tolist() == [KVPoll.Success, KVPoll.Failed]
    assert result.failures == {2: "peer gone"}
    book.clear(2)
    book.construct(2)  # the same room number, a new life
    assert _poll(book, 1, 2) == [KVPoll.Success, KVPoll.Bootstrapping]


def test_an_answer_held_in_bootstrapping_by_an_init_delay_ends_with_the_delay() -> None:
    book = RoomBook("test")
    book.construct(5)
    book.init(5, ({"peer": 0},), delay=0.05)
    assert _poll(book, 5) == [KVPoll.Bootstrapping]
    assert _poll(book, 5) == [KVPoll.Bootstrapping]
    time.sleep(0.06)
    assert _poll(book, 5) == [KVPoll.WaitingForInput]


def test_a_caller_that_writes_into_an_answer_does_not_change_the_next() -> None:
    book = RoomBook("test")
    book.construct(3)
    first = np.asarray(book.poll(np.array([3], dtype=np.uint64)).statuses)
    first[:] = KVPoll.Failed
    assert _poll(book, 3) == [KVPoll.Bootstrapping]
