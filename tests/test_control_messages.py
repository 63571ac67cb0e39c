from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbridge.protocol.messages import (
    Abort,
    AbortAck,
    MalformedFrame,
    Metadata,
    Register,
    Status,
    decode,
    encode,
)


@pytest.mark.parametrize(
    "message",
    [
        Register(
            "dec-1",
            {"id": "x", "port": 5},
            ((4096, 8192, 1024, "cuda:1"),),
            ((1, 24, 24, "cpu"),),
            "tcp://127.0.0.1:5000",
        ),
        Abort(7, "dec-1", "timed out"),
        Status(7, "127.0.0.1:1/dp0/tp1", False, "peer gone"),
        Status(2**64 - 1, "p", True),
        AbortAck(9, "p"),
    ],
)
def test_messages_round_trip(message) -> None:
    assert decode(encode(message)) == message


def test_metadata_round_trips_pages_and_route() -> None:
    meta = Metadata(5, "dec", np.array([3, 1, 2]), 4, 2, (0, 512, 512))
    back = decode(encode(meta))
    assert back.pages.tolist() == [3, 1, 2]
    assert (back.room, back.aux_slot, back.expected, back.route) == (5, 4, 2, (0, 512, 512))
    assert decode(encode(Metadata(5, "dec", np.zeros(0), 0, 1, None))).route is None


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([b"KVB\x09\x04", b"{}"], "version 9"),
        ([b"KVB\x03\x63", b"{}"], "unknown control message kind"),
        ([b"XYZ\x01\x04", b"{}"], "not a kvbridge control frame"),
        ([b"KVB\x03\x04", b"{not json"], "not JSON"),
        ([b"KVB\x03\x04", b'{"room": 0, "prefill_key": "p", "ok": true}'], "room"),
        ([b"KVB\x03\x04", b'{"room": 1, "prefill_key": "p", "ok": 1}'], "ok must be"),
        ([b"KVB\x03\x02", b'{"room": 1}', b"\x00" * 7], "whole number"),
        ([b"KVB\x03\x05", b'{"room": 1, "prefill_key": "p"}', b"x"], "payload"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(frames, message) -> None:
    with pytest.raises(MalformedFrame, match=message):
        decode(frames)


@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_garbage_never_raises_anything_but_malformed_frame(frames) -> None:
    with contextlib.suppress(MalformedFrame):
        decode(frames)


@given(
    st.sampled_from([1, 2, 3, 4, 5]),
    st.dictionaries(
        st.sampled_from(
            [
                "room",
                "decode_key",
                "prefill_key",
                "ok",
                "reason",
                "aux_slot",
                "expected",
                "route",
                "endpoint",
                "kv_regions",
                "aux_regions",
                "control",
                "sender_key",
            ]
        ),
        st.none()
        | st.booleans()
        | st.integers(-5, 2**65)
        | st.text(max_size=5)
        | st.lists(st.integers(-2, 5), max_size=4),
        max_size=13,
    ),
)
def test_wrong_typed_headers_never_crash_the_decoder(kind, header) -> None:
    import json

    frames = [b"KVB\x03" + bytes([kind]), json.dumps(header).encode()]
    if kind == 2:
        frames.append(b"")
    with contextlib.suppress(MalformedFrame):
        decode(frames)
