"""WriterLiveness (pure): silence counts only while this rank is looking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.protocol.liveness import WriterLiveness

INTERVAL = 1.0
MISSES = 3
LIMIT = INTERVAL * MISSES


def test_a_silent_writer_is_declared_dead_after_the_limit() -> None:
    live = WriterLiveness(INTERVAL, MISSES)
    live.expect("w", 0.0)
    t, dead_at = 0.0, None
    while dead_at is None and t < 10 * LIMIT:
        t += 0.01
        live.looking(t)
        if "w" in live.dead(t, {"w"}):
            dead_at = t
    assert dead_at is not None and LIMIT < dead_at <= LIMIT + INTERVAL
    assert live.own_stalls == 0


def test_a_stall_of_this_rank_is_not_the_writers_silence() -> None:
    live = WriterLiveness(INTERVAL, MISSES)
    live.expect("w", 0.0)
    live.looking(0.0)
    live.heard("w", 0.5)
    # This rank's loop (and its socket thread) stalled for twice the limit: nothing was read.
    live.looking(0.5 + 2 * LIMIT)
    assert live.dead(0.5 + 2 * LIMIT, {"w"}) == []
    assert live.own_stalls == 1
    # Looking again, and still nothing from the writer: now its silence counts.
    t = 0.5 + 2 * LIMIT
    while "w" not in live.dead(t, {"w"}):
        t += 0.01
        live.looking(t)
        assert t < 0.5 + 3 * LIMIT + INTERVAL
    assert t > 0.5 + 2 * LIMIT + LIMIT - INTERVAL


@settings(max_examples=300, deadline=None)
@given(gaps=st.lists(st.floats(min_value=0.001, max_value=3 * LIMIT), min_size=1, max_size=60))
def test_a_writer_that_heartbeats_is_never_declared_dead_however_this_rank_stalls(
    gaps: list[float],
) -> None:
    """The writer sends every interval; a heartbeat reaches this rank's loop one look after the
    look that follows its sending (the socket thread was starved too). Looks come whenever."""
    live = WriterLiveness(INTERVAL, MISSES)
    live.expect("w", 0.0)
    live.looking(0.0)
    now, sent_upto, pending = 0.0, 0.0, 0
    for gap in gaps:
        now += gap
        live.looking(now)
        for _ in range(pending):  # sent before the previous look: read now
            live.heard("w", now)
        pending = 0
        while sent_upto + INTERVAL <= now:
            sent_upto += INTERVAL
            pending += 1
        assert live.dead(now, {"w"}) == [], (now, gaps)
