"""Bootstrap under stress: hostile input, slow clients, late and restarted prefills.

Real servers on loopback sockets; every limit and timeout is made small through config or
:class:`ServerLimits`, and tests poll for outcomes instead of asserting timings.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge import TransferConfig
from kvbridge.bootstrap.directory import BootstrapDirectory, DecodeExpectation
from kvbridge.bootstrap.http_client import BootstrapClient, BootstrapError, split_address
from kvbridge.bootstrap.registration import PrefillRegistration
from kvbridge.bootstrap.schema import BadRequest, json_depth, parse_control
from kvbridge.bootstrap.server import BootstrapServer, ServerLimits
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.plan import PrefillTarget


def registration(tp_rank: int = 0, tp_size: int = 1, control_port: int = 6000, **changes) -> dict:
    entry = {
        "dp_rank": 0,
        "dp_size": 1,
        "pp_rank": 0,
        "pp_size": 1,
        "cp_rank": 0,
        "cp_size": 1,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "control": f"tcp://127.0.0.1:{control_port + tp_rank}",
        "endpoint": {"id": f"e{tp_rank}"},
        "page_bytes": 2048,
        "page_size": 16,
        "kv_dtype": "bfloat16",
        "kv_layout": "head_sharded",
        "api_version": "1.0",
        "transport": "fake",
        "num_kv_regions": 4,
    }
    entry.update(changes)
    return entry


EXPECT = DecodeExpectation("fake", "bfloat16", "head_sharded", 16, 2048, 4, "1.0")


def fast_config(**changes: Any) -> TransferConfig:
    values: dict[str, Any] = {
        "bootstrap_timeout": 20.0,
        "bootstrap_backoff_max": 0.1,
        "bootstrap_retry_after": 0.3,
        "bootstrap_http_timeout": 2.0,
        "heartbeat_interval": 0.1,
        "heartbeat_max_misses": 2,
    }
    values.update(changes)
    return TransferConfig(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} never happened")


def resolve_until(directory: BootstrapDirectory, request: DecodeRequest) -> PrefillTarget | str:
    def attempt() -> PrefillTarget | str | None:
        return directory.resolve([request]).get(request.room)

    return wait_for(attempt, what=f"room {request.room} resolved")


def send_raw(server: BootstrapServer, data: bytes) -> tuple[int, dict]:
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body.decode(errors="replace")}


def http(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body


@pytest.fixture
def small_server() -> Iterator[BootstrapServer]:
    limits = ServerLimits(
        max_ranks=8, max_rooms=100, idle_timeout=0.5, sweep_interval=0.05, max_endpoint_bytes=512
    )
    server = BootstrapServer(room_ttl=0.3, limits=limits).start()
    yield server
    server.stop()


# -- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_a_client_gone_mid_body_is_no_internal_error(close: str) -> None:
    """A prefill worker killed (or cut off) while registering is the client's problem: no
    ERROR traceback, no internal error counted, the server goes on answering."""
    import struct

    server = BootstrapServer().start()
    try:
        conn = socket.create_connection((server.host, server.port))
        conn.sendall(
            b"PUT /v1/ranks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"dp_rank": '
        )
        time.sleep(0.2)  # the server is reading the body now
        if close == "rst":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        wait_for(
            lambda: (
                BootstrapClient().status(server.address)["internal_errors"] == 0
                and not server.state.ranks
            ),
            what="the server answering",
        )
        time.sleep(0.3)  # the handler has seen the connection end by now
        assert BootstrapClient().status(server.address)["internal_errors"] == 0
    finally:
        server.stop()


def test_deeply_nested_json_is_400_not_500(small_server) -> None:
    for depth in (40, 900, 2000, 100_000):  # past the limit, near and past the recursion limit
        status, body = send_raw(small_server, http("PUT", "/v1/rooms", b"[" * depth))
        assert status == 400, (depth, body)
        status, body = send_raw(small_server, http("PUT", "/v1/rooms", b"[" * depth + b"]" * depth))
        assert status == 400 and "nested" in body["error"], (depth, body)
    nested: dict = {}
    for _ in range(60):
        nested = {"a": nested}
    entry = registration(endpoint=nested)
    status, body = send_raw(small_server, http("PUT", "/v1/ranks", json.dumps(entry).encode()))
    assert status == 400 and "nested" in body["error"]
    assert small_server.state.ranks == {}


def test_non_utf8_authorization_is_401_not_500() -> None:
    server = BootstrapServer(token="t" * 32).start()
    try:
        request = (
            b"GET /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\x80\r\n\r\n"
        )
        status, body = send_raw(server, request)
        assert status == 401 and "token" in body["error"]
    finally:
        server.stop()


def test_huge_endpoint_and_too_many_ranks_are_refused(small_server) -> None:
    big = registration(endpoint={"blob": "x" * 2000})
    status, body = send_raw(small_server, http("PUT", "/v1/ranks", json.dumps(big).encode()))
    assert status == 400 and "endpoint is" in body["error"]
    wide = registration(tp_size=16)
    status, body = send_raw(small_server, http("PUT", "/v1/ranks", json.dumps(wide).encode()))
    assert status == 400 and "more than the 8 ranks" in body["error"]
    assert small_server.state.ranks == {}


@pytest.mark.parametrize(
    "control",
    [
        "tcp://*:5000",
        "tcp://0.0.0.0:5000",
        "tcp://[::]:5",
        "tcp://h:0",
        "tcp://h:70000",
        "udp://h:5",
        "tcp://:5",
        "tcp://bad_host!:5",
        "tcp://1.2.3:5",
        "tcp://h:5x",
    ],
)
def test_control_address_is_validated_at_registration(small_server, control: str) -> None:
    entry = registration(control=control)
    status, body = send_raw(small_server, http("PUT", "/v1/ranks", json.dumps(entry).encode()))
    assert status == 400 and "control" in body["error"], body
    assert small_server.state.ranks == {}


def test_room_table_full_is_503_and_rooms_expire_on_a_timer(small_server) -> None:
    client = BootstrapClient()
    client.put_rooms(small_server.address, {r: 0 for r in range(1, 101)})
    with pytest.raises(BootstrapError, match="room table full") as caught:
        client.put_rooms(small_server.address, {500: 0})
    assert caught.value.status == 503
    # No query runs: the sweeper alone empties the table once the entries expire.
    wait_for(lambda: len(small_server.state.rooms) == 0, what="rooms swept")
    client.put_rooms(small_server.address, {500: 0})
    assert client.query_rooms(small_server.address, [500]) == {500: 0}


def test_idle_and_slow_connections_are_closed(small_server) -> None:
    idle = [socket.create_connection((small_server.host, small_server.port)) for _ in range(40)]
    slow = [socket.create_connection((small_server.host, small_server.port)) for _ in range(20)]
    for s in slow:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    try:
        for s in idle + slow:
            s.settimeout(20)
            assert _read_to_eof(s) == b""  # closed by the server, nothing answered
    finally:
        for s in idle + slow:
            s.close()
    assert BootstrapClient().health(small_server.address)


def _read_to_eof(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_slow_body_gets_408(small_server) -> None:
    with socket.create_connection((small_server.host, small_server.port), timeout=20) as s:
        s.sendall(b"PUT /v1/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = s.recv(4096)
    assert b" 408 " in answer.split(b"\r\n")[0]


def test_an_unexpected_exception_is_a_logged_4xx(small_server, monkeypatch, caplog) -> None:
    def broken(data: Any) -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(small_server.state, "query_rooms", broken)
    with caplog.at_level(logging.ERROR, logger="kvbridge.bootstrap"):
        status, body = send_raw(small_server, http("POST", "/v1/rooms/query", b'{"rooms": [1]}'))
    assert status == 400 and "RuntimeError" in body["error"]
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
    assert BootstrapClient().status(small_server.address)["internal_errors"] == 1


# -- parsers (property tests) ------------------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_unspecified and not ip.is_multicast).map(str),
    st.ip_addresses(v=6)
    .filter(lambda ip: not ip.is_unspecified and not ip.is_multicast)
    .map(lambda ip: f"[{ip}]"),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9](\.[a-z][a-z0-9]{0,10})*\Z").filter(
        lambda h: len(h) <= 253  # DNS names are at most 253 characters
    ),
)


@settings(max_examples=300, deadline=None)
@given(hosts, st.integers(1, 65535))
def test_parse_control_accepts_every_connectable_address(host: str, port: int) -> None:
    assert parse_control(f"tcp://{host}:{port}") == (host, port)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_control_never_raises_anything_but_bad_request(text: str) -> None:
    try:
        host, port = parse_control(text)
    except BadRequest:
        return
    assert text == f"tcp://{host}:{port}" and 0 < port < 65536


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=30,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_json_depth_matches_the_recursive_definition(value: Any) -> None:
    assert json_depth(value) == _depth(value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_split_address_raises_only_bootstrap_error(text: str) -> None:
    try:
        host, port = split_address(text)
    except BootstrapError:
        return
    assert host and 0 < port < 65536


# -- decode side: late, failed, restarted prefills ------------------------------------------------


def test_prefill_that_starts_late_is_served_within_bootstrap_timeout() -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    directory = BootstrapDirectory(fast_config(), 0, 1, EXPECT)
    server: BootstrapServer | None = None
    try:
        assert directory.resolve([DecodeRequest(1, 1, addr)]) == {}  # nothing listens yet
        time.sleep(0.5)
        server = BootstrapServer(port=port).start()  # listening, but 503 until registered
        assert directory.resolve([DecodeRequest(1, 1, addr)]) == {}
        time.sleep(0.5)
        BootstrapClient().register_rank(addr, registration())
        target = resolve_until(directory, DecodeRequest(1, 1, addr))
        assert isinstance(target, PrefillTarget) and target.peers == ({"id": "e0"},)
    finally:
        directory.close()
        if server is not None:
            server.stop()


def test_failed_address_is_tried_again_for_later_requests() -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    lost: list[tuple[str, str]] = []
    config = fast_config(bootstrap_timeout=0.3)
    directory = BootstrapDirectory(config, 0, 1, EXPECT, on_lost=lambda a, r: lost.append((a, r)))
    server: BootstrapServer | None = None
    try:
        reason = resolve_until(directory, DecodeRequest(1, 1, addr))
        assert isinstance(reason, str) and "not usable after" in reason
        wait_for(lambda: lost, what="on_lost")  # it never served a target: all rooms wait
        server = BootstrapServer(port=port).start()
        BootstrapClient().register_rank(addr, registration())
        room = 2
        while True:  # later requests: refused during bootstrap_retry_after, then served
            outcome = resolve_until(directory, DecodeRequest(room, 1, addr))
            if isinstance(outcome, PrefillTarget):
                break
            room += 1
            time.sleep(0.05)
        assert outcome.peers == ({"id": "e0"},)
    finally:
        directory.close()
        if server is not None:
            server.stop()


def test_restarted_prefill_is_used_with_its_new_ranks() -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    server = BootstrapServer(port=port).start()
    BootstrapClient().register_rank(addr, registration(control_port=6000))
    lost: list[tuple[str, str]] = []
    directory = BootstrapDirectory(
        fast_config(), 0, 1, EXPECT, on_lost=lambda a, r: lost.append((a, r))
    )
    try:
        first = resolve_until(directory, DecodeRequest(1, 1, addr))
        assert isinstance(first, PrefillTarget) and first.plan[0].control == "tcp://127.0.0.1:6000"
        server.stop()  # the prefill dies with its bootstrap server...
        state = directory._addresses[addr]
        wait_for(lambda: state.misses >= 3, what="missed health checks")
        # ...which fails nothing already resolved, and nothing is reported lost
        assert lost == []
        server = BootstrapServer(port=port).start()  # ...and comes back with new ranks
        BootstrapClient().register_rank(addr, registration(control_port=7000))

        def new_target() -> bool:
            directory.forget_room(2)
            found = directory.resolve([DecodeRequest(2, 1, addr)]).get(2)
            return isinstance(found, PrefillTarget) and found.plan[0].control.endswith(":7000")

        wait_for(new_target, what="the restarted prefill's ranks used")
        assert lost == []
    finally:
        directory.close()
        server.stop()


def test_room_dp_rank_published_late_is_found() -> None:
    server = BootstrapServer().start()
    client = BootstrapClient()
    for dp in (0, 1):
        client.register_rank(server.address, registration(dp_rank=dp, dp_size=2))
    directory = BootstrapDirectory(fast_config(), 0, 1, EXPECT)
    try:
        request = DecodeRequest(77, 1, server.address)
        wait_for(lambda: directory.resolve([request]) == {} and directory._wanted_rooms)
        time.sleep(0.3)  # queried a few times, unknown each time
        client.put_rooms(server.address, {77: 1})
        target = resolve_until(directory, request)
        assert isinstance(target, PrefillTarget) and target.controls == (
            f"{server.address}/dp1/tp0",
        )
    finally:
        directory.close()
        server.stop()


def client_connections(ports: set[int]) -> list[str]:
    """Established TCP connections (of this machine) whose remote port is one of ``ports``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) in ports:
                    found.append(line)
    return found


def test_idle_addresses_are_forgotten_and_no_socket_stays_open() -> None:
    servers = [BootstrapServer().start() for _ in range(6)]
    try:
        for s in servers:
            BootstrapClient().register_rank(s.address, registration())
        config = fast_config(bootstrap_timeout=0.3, bootstrap_retry_after=0.2)
        directory = BootstrapDirectory(config, 0, 1, EXPECT)
        try:
            ports = {s.port for s in servers}
            for i, s in enumerate(servers):
                target = resolve_until(directory, DecodeRequest(i + 1, 1, s.address))
                assert isinstance(target, PrefillTarget)
            time.sleep(0.3)  # a few health checks of each
            # One connection per request: none stays open (polled: a check may be in flight).
            wait_for(lambda: not client_connections(ports), what="no open client connection")
            wait_for(lambda: directory.addresses == [], what="idle addresses forgotten")
        finally:
            directory.close()
        assert not directory._thread.is_alive()
    finally:
        for s in servers:
            s.stop()


# -- prefill side: registrations survive a restarted bootstrap server ------------------------------


def test_restarted_bootstrap_server_gets_the_ranks_and_rooms_back() -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    server = BootstrapServer(port=port).start()
    client = PrefillRegistration(check_interval=0.1, backoff_max=0.1)
    try:
        for tp in (0, 1):
            client.register(addr, registration(tp, tp_size=2))
        client.publish_rooms(addr, {5: 0, 6: 0})
        wait_for(lambda: len(server.state.rooms) == 2, what="rooms published")
        server.stop()
        client.publish_rooms(addr, {7: 0})  # while the server is down: never blocks
        server = BootstrapServer(port=port).start()
        wait_for(lambda: len(server.state.ranks) == 2, what="ranks registered again")
        wait_for(lambda: set(server.state.rooms) == {5, 6, 7}, what="rooms published again")
        assert BootstrapClient().info(addr)["ranks"][1]["control"] == "tcp://127.0.0.1:6001"
    finally:
        client.close()
        server.stop()
    assert client._thread is not None and not client._thread.is_alive()


def test_registration_waits_for_a_bootstrap_server_that_starts_later() -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    client = PrefillRegistration(BootstrapClient(timeout=0.5), check_interval=0.1, backoff_max=0.1)
    server: BootstrapServer | None = None
    try:
        assert client.register(addr, registration(), attempts=2, interval=0.01) is None
        server = BootstrapServer(port=port).start()
        wait_for(lambda: len(server.state.ranks) == 1, what="late registration")
    finally:
        client.close()
        if server is not None:
            server.stop()


@pytest.mark.parametrize("grace, levels", [(60.0, {"INFO"}), (0.0, {"INFO", "WARNING"})])
def test_a_bootstrap_server_not_started_yet_is_no_warning_within_the_grace(
    caplog: pytest.LogCaptureFixture, grace: float, levels: set[str]
) -> None:
    """Engines start their bootstrap server after their ranks register (vLLM: the workers
    register KV caches before the scheduler exists), so that is INFO, one attempt, and the
    upkeep thread registers later; a server that stays away past the grace is a WARNING."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    client = PrefillRegistration(
        BootstrapClient(timeout=0.5), check_interval=0.05, backoff_max=0.05, start_grace=grace
    )
    server: BootstrapServer | None = None
    try:
        with caplog.at_level("INFO", logger="kvbridge"):
            assert client.register(addr, registration()) is None
            wait_for(
                lambda: any("upkeep" in r.getMessage() for r in caplog.records),
                what="an upkeep attempt",
            )
        said = {r.levelname for r in caplog.records if addr in r.getMessage()}
        assert said == levels, [(r.levelname, r.getMessage()) for r in caplog.records]
        server = BootstrapServer(port=port).start()
        wait_for(lambda: len(server.state.ranks) == 1, what="late registration")
    finally:
        client.close()
        if server is not None:
            server.stop()


def test_client_threads_end_on_close_even_while_the_server_hangs() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections, never answers
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    client = PrefillRegistration(
        BootstrapClient(timeout=0.3), check_interval=0.05, backoff_max=0.05
    )
    try:
        client.publish_rooms(addr, {1: 0})
        time.sleep(0.2)
        started = threading.active_count()
        client.close()
        assert client._thread is not None and not client._thread.is_alive()
        assert threading.active_count() < started
    finally:
        listener.close()


# -- decode side: info an engine fetched itself ----------------------------------------------------


class CountingClient(BootstrapClient):
    def __init__(self) -> None:
        super().__init__()
        self.info_calls = 0

    def info(self, addr: str) -> dict[str, Any]:
        self.info_calls += 1
        return super().info(addr)


def test_offered_info_resolves_at_once_without_a_second_look_up() -> None:
    server = BootstrapServer().start()
    BootstrapClient().register_rank(server.address, registration())
    client = CountingClient()
    directory = BootstrapDirectory(fast_config(), 0, 1, EXPECT, client=client)
    try:
        info = BootstrapClient().info(server.address)
        assert directory.offer(server.address, info) is None
        found = directory.resolve([DecodeRequest(1, 1, server.address)])
        assert isinstance(found[1], PrefillTarget) and found[1].peers == ({"id": "e0"},)
        time.sleep(0.2)  # the directory's thread had time to look it up (it must not)
        assert client.info_calls == 0
        assert directory.offer(server.address, {"junk": 1}) is None  # info held is kept
    finally:
        directory.close()
        server.stop()


def test_offered_info_of_an_incompatible_prefill_fails_its_requests_with_the_reason() -> None:
    server = BootstrapServer().start()
    BootstrapClient().register_rank(server.address, registration(kv_dtype="float16"))
    directory = BootstrapDirectory(fast_config(bootstrap_retry_after=30), 0, 1, EXPECT)
    try:
        reason = directory.offer(server.address, BootstrapClient().info(server.address))
        assert reason is not None and "kv_dtype is 'float16'" in reason
        found = directory.resolve([DecodeRequest(1, 1, server.address)])
        assert found == {1: reason}
    finally:
        directory.close()
        server.stop()


def test_malformed_offered_info_is_a_reason_and_the_directory_looks_it_up_itself() -> None:
    server = BootstrapServer().start()
    BootstrapClient().register_rank(server.address, registration())
    directory = BootstrapDirectory(fast_config(), 0, 1, EXPECT)
    try:
        good = BootstrapClient().info(server.address)
        reason = directory.offer(server.address, {**good, "generation": "7"})
        assert reason is not None and "malformed" in reason
        target = resolve_until(directory, DecodeRequest(1, 1, server.address))
        assert isinstance(target, PrefillTarget)
    finally:
        directory.close()
        server.stop()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


RANK = {**registration(), "authoritative": True}
GOOD_INFO = {
    **{k: RANK[k] for k in ("page_bytes", "page_size", "kv_dtype", "kv_layout", "transport")},
    **{"api_version": RANK["api_version"], "num_kv_regions": RANK["num_kv_regions"]},
    "instance": "i",
    "generation": 1,
    "sizes": {"dp_size": 1, "pp_size": 1, "cp_size": 1, "tp_size": 1},
    "ranks": [RANK],
}


def _changed(base: dict, keys: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(keys), JSON, max_size=2).map(lambda c: {**base, **c})


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        JSON,
        _changed(GOOD_INFO, list(GOOD_INFO)),
        _changed(GOOD_INFO["sizes"], list(GOOD_INFO["sizes"])).map(
            lambda sizes: {**GOOD_INFO, "sizes": sizes}
        ),
        _changed(RANK, list(RANK)).map(lambda rank: {**GOOD_INFO, "ranks": [rank]}),
    )
)
def test_offered_info_is_untrusted_and_never_raises(info: Any) -> None:
    directory = BootstrapDirectory(fast_config(), 0, 1, EXPECT, client=NO_ANSWER)
    try:
        reason = directory.offer("127.0.0.1:9", info)
        assert reason is None or isinstance(reason, str)
        if reason is None:  # taken: resolving must not raise either
            found = directory.resolve([DecodeRequest(1, 1, "127.0.0.1:9")])
            assert all(isinstance(v, (PrefillTarget, str)) for v in found.values())
    finally:
        directory.close()


class _NoAnswer(BootstrapClient):
    def request(self, method: str, addr: str, path: str, body: Any = None) -> Any:
        raise BootstrapError("no bootstrap server in this test")


NO_ANSWER = _NoAnswer()


@pytest.mark.parametrize(
    "answer",
    [
        {**GOOD_INFO, "sizes": {**GOOD_INFO["sizes"], "tp_size": None}},
        {**GOOD_INFO, "ranks": [{**RANK, "tp_rank": []}]},
        {**GOOD_INFO, "generation": "x"},
    ],
)
def test_a_bootstrap_server_answering_malformed_info_fails_requests_not_the_scheduler(
    answer: dict,
) -> None:
    """A prefill's bootstrap server is a network peer like any other: what it answers is
    checked before a room is planned with it (these answers used to raise in ``resolve``,
    on the engine's scheduler thread, or end the directory's thread)."""
    import http.server

    body = json.dumps(answer).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    addr = f"127.0.0.1:{server.server_address[1]}"
    directory = BootstrapDirectory(fast_config(bootstrap_timeout=0.5), 0, 1, EXPECT)
    try:
        reason = resolve_until(directory, DecodeRequest(1, 1, addr))
        assert isinstance(reason, str) and "malformed info" in reason
    finally:
        directory.close()
        server.shutdown()
        server.server_close()


def test_a_prefill_restarted_while_refused_is_served_before_the_refusal_ends() -> None:
    """A prefill that served, died (liveness saw it) and stayed unreachable past
    ``bootstrap_timeout`` is refused for ``bootstrap_retry_after`` (new requests fail fast);
    once it answers again the refusal ends, instead of refusing the restarted prefill's
    first requests until ``retry_after`` (60 s here, three times the wait below)."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    server = BootstrapServer(port=port).start()
    BootstrapClient().register_rank(addr, registration())
    config = fast_config(bootstrap_timeout=0.5, bootstrap_retry_after=60.0)
    directory = BootstrapDirectory(config, 0, 1, EXPECT)
    try:
        assert isinstance(resolve_until(directory, DecodeRequest(1, 1, addr)), PrefillTarget)
        server.stop()
        directory.writer_dead(addr)  # what liveness reports when the prefill's ranks die
        refused = resolve_until(directory, DecodeRequest(2, 1, addr))
        assert isinstance(refused, str) and "not usable after" in refused
        server = BootstrapServer(port=port).start()
        BootstrapClient().register_rank(addr, registration(control_port=7000))
        room = 3

        def served() -> bool:
            nonlocal room
            room += 1
            found = directory.resolve([DecodeRequest(room, 1, addr)]).get(room)
            return isinstance(found, PrefillTarget)

        wait_for(served, what="the restarted prefill served")
    finally:
        directory.close()
        server.stop()


def test_offered_info_nested_too_deep_is_malformed_not_a_recursion_error() -> None:
    deep: list = []
    inner = deep
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    directory = BootstrapDirectory(fast_config(), 0, 1, EXPECT, client=NO_ANSWER)
    try:
        endpoint = {"id": "e0", "x": deep}
        reason = directory.offer(
            "127.0.0.1:9", {**GOOD_INFO, "ranks": [{**RANK, "endpoint": endpoint}]}
        )
        assert reason is not None and "nested more than" in reason
    finally:
        directory.close()
