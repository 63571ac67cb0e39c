"""The hold for aborts whose prefill has not answered yet (pure: ``HeldAborts``), as a state
machine: every held abort is sent once its address answered or given up once its hold passed,
exactly once, and the hold never grows past its limit."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbridge.protocol.decode import HeldAborts

ADDRS = ["a:1", "b:2", "c:3"]

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("hold"), st.sampled_from(ADDRS)),
        st.tuples(st.just("release"), st.sets(st.sampled_from(ADDRS))),
        st.tuples(st.just("tick"), st.integers(0, 2).map(float) | st.floats(0, 3)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(0, 6))
@example([("hold", "a:1"), ("tick", 2.0), ("release", set())], 1)  # given up at the boundary
def test_each_held_abort_is_sent_or_given_up_exactly_once(ops: list, limit: int) -> None:
    hold: HeldAborts[int] = HeldAborts(timeout=2.0, limit=limit)
    now, serial = 0.0, 0
    live: dict[int, tuple[str, float]] = {}  # message -> (address, give up at)
    outcome: dict[int, str] = {}
    for op, arg in ops:
        if op == "tick":
            now += arg
        elif op == "hold":
            serial += 1
            taken = hold.hold(arg, serial, now)
            assert taken == (len(live) < limit)
            if taken:
                live[serial] = (arg, now + 2.0)
        else:
            decided = hold.release(arg, now)
            for addr, messages in decided.send:
                assert addr in arg
                for m in messages:
                    assert live.pop(m)[0] == addr and m not in outcome
                    outcome[m] = "sent"
            dropped = {addr: n for addr, n in decided.dropped}
            for addr in ADDRS:
                gone = [m for m, (a, until) in live.items() if a == addr and now >= until]
                if addr in arg:
                    assert not gone  # sent above, never dropped
                    continue
                assert dropped.get(addr, 0) == len(gone)
                for m in gone:
                    del live[m]
                    outcome[m] = "dropped"
        assert len(hold) == len(live) <= limit
        assert set(hold.addresses) == {a for a, _ in live.values()}
