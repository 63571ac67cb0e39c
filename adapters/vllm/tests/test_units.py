"""Rooms, config and version checks: no vLLM needed."""

from __future__ import annotations

import types

import pytest

from kvbridge_vllm.config import ConnectorConfig, normalize_addr
from kvbridge_vllm.rooms import RoomCollision, RoomTable, room_of
from kvbridge_vllm.version import Unsupported, check_config, check_version


def test_room_is_stable_nonzero_64bit() -> None:
    assert room_of("kvb-1") == room_of("kvb-1")
    assert room_of("kvb-1") != room_of("kvb-2")
    rooms = {room_of(f"id-{i}") for i in range(10000)}
    assert len(rooms) == 10000
    assert all(0 < r < 2**64 for r in rooms)
    with pytest.raises(ValueError):
        room_of("")
    # A client's JSON may carry a lone surrogate: still a room, never an exception in vLLM's
    # scheduler, and the same on both sides (ids that are valid UTF-8 keep their rooms).
    assert room_of("\ud800") == room_of("\ud800") != room_of("\ud801")


def test_room_table_refuses_a_second_live_request() -> None:
    table = RoomTable()
    room = table.claim("t1", "req-a")
    assert table.claim("t1", "req-a") == room  # the same request again is fine
    with pytest.raises(RoomCollision, match="req-a"):
        table.claim("t1", "req-b")
    assert table.release("req-a") == room
    assert table.claim("t1", "req-b") == room
    assert len(table) == 1


def test_config_from_extra() -> None:
    cfg = ConnectorConfig.from_extra(
        {"kvbridge": {"transport": "nixl", "bootstrap_timeout": 5}, "bootstrap_port": 9000}
    )
    assert cfg.transfer.transport == "nixl"
    assert cfg.transfer.bootstrap_timeout == 5
    assert cfg.bootstrap_addr == "127.0.0.1:9000"
    with pytest.raises(ValueError, match="unknown keys"):
        ConnectorConfig.from_extra({"transport": "nixl"})
    with pytest.raises(ValueError):
        ConnectorConfig.from_extra({"kvbridge": {"transport": "fake", "no_such": 1}})
    assert normalize_addr("http://10.0.0.1:8998/") == "10.0.0.1:8998"


def test_version_refusal_names_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_version("0.32.0") == "0.32.0"
    assert check_version("0.32.1+cpu") == "0.32.1+cpu"
    monkeypatch.delenv("KVBRIDGE_VLLM_ALLOW_UNTESTED", raising=False)
    with pytest.raises(Unsupported, match="KVBRIDGE_VLLM_ALLOW_UNTESTED"):
        check_version("0.40.0")
    monkeypatch.setenv("KVBRIDGE_VLLM_ALLOW_UNTESTED", "1")
    assert check_version("0.40.0") == "0.40.0"


def _vllm_config(role: str = "kv_producer", pp: int = 1, dp: int = 1, mla: bool = False):
    ns = types.SimpleNamespace
    return ns(
        kv_transfer_config=ns(kv_role=role),
        parallel_config=ns(
            pipeline_parallel_size=pp, data_parallel_size=dp, decode_context_parallel_size=1
        ),
        model_config=ns(use_mla=mla),
    )


def test_config_refusals_name_the_flag() -> None:
    check_config(_vllm_config(), types.SimpleNamespace(kv_cache_groups=[1]))
    with pytest.raises(Unsupported, match="kv_both"):
        check_config(_vllm_config(role="kv_both"))
    with pytest.raises(Unsupported, match="--pipeline-parallel-size"):
        check_config(_vllm_config(pp=2))
    with pytest.raises(Unsupported, match="--data-parallel-size"):
        check_config(_vllm_config(dp=2))
    check_config(_vllm_config(mla=True))  # the latent cache is described as replicated
    with pytest.raises(Unsupported, match="KV cache groups"):
        check_config(_vllm_config(), types.SimpleNamespace(kv_cache_groups=[1, 2]))


def test_kvbridge_logs_join_vllms_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging

    from kvbridge_vllm.logs import LOGGERS, route_to_vllm_log

    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in LOGGERS}
    stream = io.StringIO()
    vllm_handler = logging.StreamHandler(stream)
    vllm_handler.setFormatter(logging.Formatter("VLLM %(levelname)s %(name)s: %(message)s"))
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(vllm_handler)
    try:
        for name in LOGGERS:
            logging.getLogger(name).handlers.clear()
        monkeypatch.setenv("KVBRIDGE_LOG_LEVEL", "debug")
        route_to_vllm_log()
        route_to_vllm_log()  # twice: still one handler each
        logging.getLogger("kvbridge.queue").debug("room %d", 7)
        logging.getLogger("kvbridge_vllm").info("hello")
        assert stream.getvalue().splitlines() == [
            "VLLM DEBUG kvbridge.queue: room 7",
            "VLLM INFO kvbridge_vllm: hello",
        ]
        assert all(len(logging.getLogger(n).handlers) == 1 for n in LOGGERS)
    finally:
        vllm_logger.removeHandler(vllm_handler)
        for name, (handlers, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = True


def test_a_late_driver_step_is_reported_with_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    from kvbridge_vllm.stalls import WARN_EVERY, StallWatch

    watch = StallWatch(heartbeat_interval=1.0)
    with caplog.at_level("WARNING", logger="kvbridge_vllm"):
        watch.step_done(last=10.0, began=10.004, ended=10.005)  # on time: nothing
        assert caplog.records == []
        watch.step_done(last=10.0, began=13.0, ended=13.25)  # starved 3 s, slow step 0.25 s
        (record,) = caplog.records
        assert "3.25 s since its last step (3.00 s waiting to run, 0.25 s inside" in (
            record.getMessage()
        )
        watch.step_done(last=14.0, began=15.0, ended=15.0)  # within WARN_EVERY: held back
        assert len(caplog.records) == 1
        t = 13.25 + WARN_EVERY
        watch.step_done(last=t, began=t + 2, ended=t + 2)
        assert len(caplog.records) == 2
        assert "(1 more late steps not logged)" in caplog.records[1].getMessage()
    assert watch.stalls == 3
    watch.close()
