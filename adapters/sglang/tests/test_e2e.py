"""kvbridge-sglang end to end: real SGLang servers (prefill, decode, a plain reference) as
separate processes, requests through the real sglang-router, every configured transport.

What must hold: decode's greedy output equals one plain server's for prompts of 10-900 tokens
(also when prefill's prefix cache serves a repeated prompt); a decode whose KV writes are
discarded (the Fake's ``discard_kv_ranks`` fault) computes something else, so the outputs above
really came from the transferred KV; bad requests fail alone; a vanished client and a killed
prefill leave the survivors serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sglang_servers as ss

from kvbridge.testing import processes
from kvbridge.testing.tiny_model import prompt

#: Prompt lengths in tokens (one word = one token), and one prompt sent twice in a row.
LENGTHS = (10, 64, 257, 600, 900)
PROMPTS = [prompt(n, seed) for seed, n in enumerate(LENGTHS)]
REPEATED = PROMPTS[2]
MAX_NEW = 10
TRANSPORTS = os.environ.get("KVBRIDGE_SGLANG_TRANSPORTS", "fake,mooncake,nixl").split(",")


@pytest.fixture(scope="module")
def reference(model: Path, logs: Path) -> dict[str, list[int]]:
    """Greedy outputs of one plain SGLang server."""
    server = ss.start_sglang("single", model, logs)
    try:
        processes.wait_ready([server], timeout=600)
        return {p: ss.output_ids(ss.generate(server.url, p, MAX_NEW)) for p in PROMPTS}
    finally:
        processes.stop(server)


class Pair:
    """A prefill and a decode server on one transport, and sglang-router in front."""

    def __init__(
        self,
        model: Path,
        logs: Path,
        transport: str,
        decode_env: dict[str, str] | None = None,
        decode_tp: int = 1,
    ) -> None:
        self.model, self.logs, self.transport = model, logs, transport
        self.env = ss.base_env(KVBRIDGE_TRANSPORT=transport)
        self.boot = processes.free_port()
        self.prefill = self.start_prefill()
        self.decode = ss.start_sglang(
            f"decode-{transport}",
            model,
            logs,
            mode="decode",
            tp=decode_tp,
            env={**self.env, **(decode_env or {})},
        )
        self.router: processes.Server | None = None
        try:
            processes.wait_ready([self.prefill, self.decode], timeout=600)
            self.router = ss.start_router(self.prefill, self.boot, self.decode, logs)
            processes.wait_ready([self.router], timeout=300)
            ss.wait_router(self.router)
        except BaseException:
            self.close()
            raise

    def start_prefill(self, port: int | None = None) -> processes.Server:
        return ss.start_sglang(
            f"prefill-{self.transport}",
            self.model,
            self.logs,
            mode="prefill",
            bootstrap_port=self.boot,
            env=self.env,
            port=port,
        )

    def generate(self, text: str, max_new: int = MAX_NEW) -> list[int]:
        return ss.output_ids(ss.generate(self.url, text, max_new))

    def both_legs(self, text: str, room: Any, max_new: int = MAX_NEW, **over: Any) -> Any:
        """Send prefill and decode the same body at once, as the router does."""
        fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": self.boot}
        fields["bootstrap_room"] = room
        fields.update(over)
        with cf.ThreadPoolExecutor(2) as ex:
            legs = [
                ex.submit(_answer, s.url, text, max_new, fields)
                for s in (self.prefill, self.decode)
            ]
            return [leg.result() for leg in legs]

    @property
    def url(self) -> str:
        assert self.router is not None
        return self.router.url

    def close(self) -> None:
        for s in (self.router, self.decode, self.prefill):
            processes.stop(s)


def _answer(url: str, text: str, max_new: int, fields: dict[str, Any]) -> tuple[int, Any]:
    """(HTTP status, body) of one /generate: errors are answers here, not exceptions."""
    try:
        return 200, ss.generate(url, text, max_new, **fields)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body


# The tests with a pair of their own come first: pytest keeps the module-scoped ``pair`` of
# the last transport up until the module ends, and two pairs at once overload 2 vCPUs.


def test_decode_without_the_transferred_kv_computes_something_else(
    model: Path, logs: Path, reference: dict[str, list[int]]
) -> None:
    """The control: decode lands the metadata rows (first token) but throws the KV away."""
    control = Pair(
        model,
        logs,
        "fake",
        decode_env={"KVBRIDGE_FAKE_FAULTS": json.dumps({"discard_kv_ranks": [0]})},
    )
    try:
        outs = {t: control.generate(t) for t in PROMPTS[1:]}
    finally:
        control.close()
    for text, out in outs.items():
        assert out[0] == reference[text][0]  # sampled on prefill, it rides in the aux row
    assert any(out != reference[t] for t, out in outs.items()), "decode ignored the KV?"


@pytest.mark.parametrize("transport", ["fake", "mooncake"])
def test_a_killed_prefill_fails_its_requests_and_a_new_one_serves(
    transport: str, model: Path, logs: Path, reference: dict[str, list[int]]
) -> None:
    p = Pair(model, logs, transport)
    try:
        assert p.generate(PROMPTS[0]) == reference[PROMPTS[0]]
        with cf.ThreadPoolExecutor(4) as ex:
            flying = [ex.submit(_answer, p.url, t, 200, {}) for t in PROMPTS[2:]]
            time.sleep(1.0)
            processes.kill(p.prefill)
            answers = [f.result() for f in flying]
        assert all(status != 200 or isinstance(b, dict) for status, b in answers)
        assert p.decode.alive()
        p.prefill = p.start_prefill(port=p.prefill.port)  # same addresses, a new process
        processes.wait_ready([p.prefill], timeout=600)
        deadline = time.monotonic() + 120
        while True:  # the router marks a restarted worker healthy again after a while
            status, answer = _answer(p.url, PROMPTS[1], MAX_NEW, {})
            if status == 200:
                break
            assert time.monotonic() < deadline, answer
            time.sleep(2)
        assert ss.output_ids(answer) == reference[PROMPTS[1]]
    finally:
        p.close()


def test_a_tp1_prefill_feeds_a_tp2_decode(
    model: Path, logs: Path, reference: dict[str, list[int]]
) -> None:
    """Unequal TP: each decode rank gets its KV head's half of every prefill page."""
    p = Pair(model, logs, "fake", decode_tp=2)
    try:
        for text in PROMPTS[:4]:
            assert p.generate(text) == reference[text]
    finally:
        p.close()


@pytest.fixture(scope="module", params=TRANSPORTS)
def pair(request: pytest.FixtureRequest, model: Path, logs: Path) -> Iterator[Pair]:
    p = Pair(model, logs, request.param)
    try:
        yield p
    finally:
        p.close()


def test_outputs_equal_a_single_server(pair: Pair, reference: dict[str, list[int]]) -> None:
    before = ss.metrics(pair.prefill)
    for text in PROMPTS:
        assert pair.generate(text) == reference[text], f"{len(text.split())}-token prompt"
    # Again: prefill's radix cache now holds this prompt, decode still gets all of its KV.
    assert pair.generate(REPEATED) == reference[REPEATED]
    with cf.ThreadPoolExecutor(4) as ex:  # concurrent requests interleave on both sides
        outs = list(ex.map(pair.generate, PROMPTS))
    assert outs == [reference[t] for t in PROMPTS]
    # What the sender reported to SGLang's own KV transfer metrics (get_transfer_metric): every
    # request moved its prompt's KV, at least 4 layers x 2 x 512 B per token here.
    after = ss.metrics(pair.prefill)
    sent = after.get("sglang:kv_transfer_total_mb_count", 0) - before.get(
        "sglang:kv_transfer_total_mb_count", 0
    )
    mb = after.get("sglang:kv_transfer_total_mb_sum", 0) - before.get(
        "sglang:kv_transfer_total_mb_sum", 0
    )
    assert sent >= 2 * len(PROMPTS) + 1
    tokens = 2 * sum(LENGTHS) + LENGTHS[2]
    assert mb * 2**20 >= tokens * 4 * 512 * 0.99


def test_bad_requests_fail_alone_and_the_pair_keeps_serving(
    pair: Pair, reference: dict[str, list[int]]
) -> None:
    text = PROMPTS[0]
    for room in ("not-a-number", 2**64, 2**63, -5, 0):
        statuses = [status for status, _ in pair.both_legs(text, room, max_new=2)]
        assert all(s != 200 for s in statuses), f"room {room!r}: {statuses}"
    # The same room twice at once: at most one of the two decode requests may succeed.
    room = random.getrandbits(62) + 1
    with cf.ThreadPoolExecutor(2) as ex:
        twice = list(ex.map(lambda _: pair.both_legs(text, room, max_new=2), range(2)))
    decoded = [answer for _, answer in (legs[1] for legs in twice)]
    assert sum(isinstance(a, dict) and "output_ids" in a for a in decoded) <= 1 or all(
        ss.output_ids(a) == reference[text][:2] for a in decoded
    )
    # A room without bootstrap_host (SGLang's own address helper would raise in the decode
    # scheduler loop and take the server down).
    room = random.getrandbits(62) + 1
    for leg in pair.both_legs(text, room, max_new=2, bootstrap_host=None):
        assert leg[0] != 200 and "bootstrap_host" in json.dumps(leg[1]), leg
    # A bootstrap port where no prefill listens: that request fails, with a reason.
    status, body = _answer(
        pair.decode.url,
        text,
        2,
        {"bootstrap_host": "127.0.0.1", "bootstrap_port": processes.free_port(),
         "bootstrap_room": random.getrandbits(62) + 1},
    )  # fmt: skip
    assert status != 200, body
    assert pair.prefill.alive() and pair.decode.alive()
    assert pair.generate(PROMPTS[1]) == reference[PROMPTS[1]]


def test_a_vanished_client_leaves_the_pair_serving(
    pair: Pair, reference: dict[str, list[int]]
) -> None:
    import socket

    body = json.dumps(
        {"text": PROMPTS[4], "sampling_params": {"max_new_tokens": 200, "temperature": 0}}
    ).encode()
    port = int(pair.url.rsplit(":", 1)[1])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.3)  # gone mid-request
    for text in PROMPTS[:3]:
        assert pair.generate(text) == reference[text]
