"""The bootstrap server and client, over real HTTP on loopback."""

from __future__ import annotations

import copy
import http.client
import json
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbridge import TransferConfig
from kvbridge.bootstrap.directory import BootstrapDirectory, DecodeExpectation
from kvbridge.bootstrap.http_client import BootstrapClient, BootstrapError, BootstrapNotReady
from kvbridge.bootstrap.server import MAX_BODY, BootstrapServer
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.secret import Secret

SECRET = Secret("s3cret-for-bootstrap-tests")
TOKEN = SECRET.bootstrap_token


def registration(tp_rank: int = 0, **changes) -> dict:
    entry = {
        "dp_rank": 0,
        "dp_size": 1,
        "pp_rank": 0,
        "pp_size": 1,
        "cp_rank": 0,
        "cp_size": 1,
        "tp_rank": tp_rank,
        "tp_size": 2,
        "control": f"tcp://127.0.0.1:{6000 + tp_rank}",
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


@pytest.fixture(scope="module")
def server() -> Iterator[BootstrapServer]:
    s = BootstrapServer(token=TOKEN, room_ttl=600).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client() -> BootstrapClient:
    return BootstrapClient(token=TOKEN, timeout=5)


def raw(
    server: BootstrapServer,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = TOKEN,
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, {"raw": data.decode(errors="replace")}


def test_info_is_503_until_every_rank_registered(server, client) -> None:
    with pytest.raises(BootstrapNotReady):
        client.info(server.address)
    client.register_rank(server.address, registration(0))
    with pytest.raises(BootstrapNotReady):
        client.info(server.address)
    client.register_rank(server.address, registration(1))
    info = client.info(server.address)
    assert [r["tp_rank"] for r in info["ranks"]] == [0, 1]
    assert info["sizes"]["tp_size"] == 2 and info["page_bytes"] == 2048
    status, entry = raw(server, "GET", "/v1/ranks/0/0/0/1")
    assert status == 200 and entry["endpoint"] == {"id": "e1"} and entry["authoritative"]


def test_rooms_register_query_and_expire(server, client) -> None:
    client.put_rooms(server.address, {11: 0, 12: 0})
    assert client.query_rooms(server.address, [11, 12, 13]) == {11: 0, 12: 0, 13: None}
    state = server.state
    state.rooms[11] = (0, time.monotonic() - 1)  # expired
    assert client.query_rooms(server.address, [11])[11] is None
    # The server is shared by the module: leave no expired entry for its sweeper to remove in
    # the middle of a later test that compares the room table before and after a request.
    state.rooms.pop(11, None)


def test_conflicting_registration_is_409_and_changes_nothing(server) -> None:
    before = copy.deepcopy(server.state.ranks)
    status, body = raw(
        server, "PUT", "/v1/ranks", json.dumps(registration(1, page_bytes=4096)).encode()
    )
    assert status == 409 and "page_bytes 4096 conflicts with 2048" in body["error"]
    assert server.state.ranks == before


def _invalid_registrations() -> st.SearchStrategy[bytes]:
    keys = sorted(registration())
    wrong = st.one_of(
        st.none(),
        st.booleans(),
        st.text(max_size=4),
        st.integers(-3, -1),
        st.integers(2**41, 2**42),
        st.lists(st.integers(), max_size=2),
    )

    def corrupt(key_and_value: tuple[str, object]) -> bytes:
        key, value = key_and_value
        entry = registration(1)
        if key in ("endpoint",) and isinstance(value, dict):
            value = None
        entry[key] = value
        return json.dumps(entry).encode()

    return (
        st.tuples(st.sampled_from(keys), wrong)
        .filter(
            lambda kv: (
                not (
                    kv[0] in ("control", "kv_dtype", "kv_layout", "api_version", "transport")
                    and isinstance(kv[1], str)
                    and kv[1]
                )
            )
        )
        .map(corrupt)
    )


bad_requests = st.one_of(
    # broken JSON
    st.tuples(
        st.just("PUT"),
        st.just("/v1/ranks"),
        st.binary(min_size=1, max_size=40).filter(lambda b: not _is_json(b)),
        st.just(TOKEN),
    ),
    # wrong types
    st.tuples(st.just("PUT"), st.just("/v1/ranks"), _invalid_registrations(), st.just(TOKEN)),
    st.tuples(
        st.just("PUT"),
        st.just("/v1/rooms"),
        st.sampled_from(
            [
                b'{"rooms": {"x": 0}}',
                b'{"rooms": {"5": 7}}',
                b'{"rooms": [1]}',
                b'{"rooms": {"0": 0}}',
                b"[]",
                b'{"rooms": {"5": true}}',
            ]
        ),
        st.just(TOKEN),
    ),
    st.tuples(
        st.just("POST"),
        st.just("/v1/rooms/query"),
        st.sampled_from([b'{"rooms": {"1": 0}}', b'{"rooms": ["1"]}', b"{}", b"7"]),
        st.just(TOKEN),
    ),
    # huge bodies
    st.tuples(
        st.sampled_from(["PUT", "POST"]),
        st.sampled_from(["/v1/ranks", "/v1/rooms", "/v1/rooms/query"]),
        st.just(b"[" + b"1," * (MAX_BODY // 2) + b"1]"),
        st.just(TOKEN),
    ),
    # unknown routes and wrong methods
    st.tuples(
        st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
        st.sampled_from(
            ["/", "/v2/info", "/v1/ranks/x/0/0/0", "/v1/ranks/9/9/9/9", "/admin", "/v1/rooms"]
        ),
        st.just(b"{}"),
        st.just(TOKEN),
    ),
    # missing or wrong token, on otherwise valid requests
    st.tuples(
        st.sampled_from(["PUT"]),
        st.just("/v1/ranks"),
        st.just(json.dumps(registration(1, control="tcp://evil:1")).encode()),
        st.sampled_from([None, "wrong", ""]),
    ),
)


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_requests)
def test_bad_input_gets_a_4xx_and_changes_nothing(server, request_parts) -> None:
    method, path, body, token = request_parts
    ranks, rooms = copy.deepcopy(server.state.ranks), dict(server.state.rooms)
    status, answer = raw(server, method, path, body, token)
    assert 400 <= status < 500, (status, answer)
    assert "error" in answer or status == 405
    assert server.state.ranks == ranks
    assert set(server.state.rooms) == set(rooms)
    assert raw(server, "GET", "/health")[0] == 200


def test_health_needs_no_token_but_everything_else_does(server) -> None:
    assert raw(server, "GET", "/health", token=None)[0] == 200
    status, body = raw(server, "GET", "/v1/info", token=None)
    assert status == 401 and "token" in body["error"]


def test_router_query_names_the_engine_per_dp_rank_without_a_token() -> None:
    """vllm-router and llm-d ask ``GET /query`` on a prefill's bootstrap port before routing
    to it and cannot send kvbridge's token; the answer names no endpoint."""
    plain = BootstrapServer(token=TOKEN).start()
    served = BootstrapServer(token=TOKEN, engine_id="engine-7").start()
    try:
        assert raw(plain, "GET", "/query", token=None)[0] == 404  # not a vLLM prefill
        status, body = raw(served, "GET", "/query", token=None)
        assert status == 503 and "waiting" in body["error"]  # the router retries
        client = BootstrapClient(token=TOKEN, timeout=5)
        for dp in (0, 1):
            client.register_rank(served.address, registration(0, dp_rank=dp, dp_size=2, tp_size=1))
        status, body = raw(served, "GET", "/query", token=None)
        assert status == 200 and body == {
            "0": {"engine_id": "engine-7"},
            "1": {"engine_id": "engine-7"},
        }
        assert raw(served, "POST", "/query", b"{}", token=None)[0] == 405
        assert raw(served, "GET", "/v1/info", token=None)[0] == 401  # the rest still guarded
    finally:
        plain.stop()
        served.stop()


def expectation(**changes) -> DecodeExpectation:
    values = {
        "transport": "fake",
        "kv_dtype": "bfloat16",
        "kv_layout": "head_sharded",
        "page_size": 16,
        "page_bytes": 2048,
        "num_kv_regions": 4,
        "api_version": "1.0",
    }
    values.update(changes)
    return DecodeExpectation(**values)


def resolve_until(directory: BootstrapDirectory, request: DecodeRequest, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = directory.resolve([request])
        if request.room in found:
            return found[request.room]
        time.sleep(0.02)
    raise AssertionError("directory never answered")


@pytest.fixture
def registered(server: BootstrapServer, client: BootstrapClient) -> BootstrapServer:
    """The module's server with both prefill ranks registered, whichever tests ran before
    (registering the same entry again changes nothing)."""
    for tp_rank in (0, 1):
        client.register_rank(server.address, registration(tp_rank))
    return server


def test_directory_resolves_routes_through_bootstrap(registered) -> None:
    server = registered
    config = TransferConfig(secret=SECRET)
    directory = BootstrapDirectory(config, decode_rank=1, decode_tp=2, expectation=expectation())
    try:
        target = resolve_until(directory, DecodeRequest(31, 2, server.address))
        assert target.peers == ({"id": "e1"},)
        assert [c.control for c in target.plan] == ["tcp://127.0.0.1:6001"]
    finally:
        directory.close()


def test_incompatible_prefill_is_refused_naming_both_values(registered) -> None:
    server = registered
    config = TransferConfig(secret=SECRET)
    directory = BootstrapDirectory(config, 0, 2, expectation(kv_dtype="float16"))
    try:
        reason = resolve_until(directory, DecodeRequest(32, 2, server.address))
        assert reason == (
            f"prefill {server.address} refused: prefill kv_dtype is 'bfloat16' "
            "but this decode uses 'float16'"
        )
    finally:
        directory.close()


def test_unreachable_prefill_fails_after_bootstrap_timeout() -> None:
    config = TransferConfig(bootstrap_timeout=0.5, bootstrap_backoff_max=0.1)
    directory = BootstrapDirectory(config, 0, 1, expectation())
    try:
        reason = resolve_until(directory, DecodeRequest(33, 1, "127.0.0.1:9"))
        assert reason.startswith("prefill bootstrap 127.0.0.1:9 not usable after")
        assert "unreachable" in reason
    finally:
        directory.close()


def test_definitive_errors_fail_after_bounded_attempts(server) -> None:
    config = TransferConfig(bootstrap_max_attempts=2, bootstrap_backoff_max=0.05)
    directory = BootstrapDirectory(config, 0, 1, expectation())  # no token: 401
    try:
        reason = resolve_until(directory, DecodeRequest(34, 1, server.address))
        assert "not usable after 2 attempts" in reason and "401" in reason
    finally:
        directory.close()


def test_client_reports_http_errors_with_the_server_message(server) -> None:
    with pytest.raises(BootstrapError, match="401: missing or wrong bootstrap token"):
        BootstrapClient(token="nope").info(server.address)
