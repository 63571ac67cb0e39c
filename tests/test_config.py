from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbridge import ConfigError, TransferConfig


def test_defaults_select_the_fake_transport() -> None:
    assert TransferConfig().transport == "fake"


def test_from_dict_round_trips() -> None:
    config = TransferConfig(
        transport="nixl",
        transport_options={"backend": "UCX"},
        waiting_timeout=12.5,
        debug_lockstep=True,
    )
    assert TransferConfig.from_dict(config.to_dict()) == config


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key.*transportt.*known keys: transport"):
        TransferConfig.from_dict({"transportt": "fake"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"waiting_timeout": -1}, "waiting_timeout must be > 0"),
        ({"waiting_timeout": "soon"}, "waiting_timeout must be float"),
        ({"heartbeat_max_misses": 1.5}, "heartbeat_max_misses must be int"),
        ({"debug_lockstep": "yes"}, "debug_lockstep must be bool"),
        ({"transport": ""}, "transport must be a plugin name"),
        ({"transport_options": [1]}, "transport_options must be a mapping"),
    ],
)
def test_bad_values_get_clear_messages(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransferConfig.from_dict(data)


def test_from_toml_reads_the_kvbridge_table(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(
        '[kvbridge]\ntransport = "mooncake"\nwaiting_timeout = 30\n'
        '[kvbridge.transport_options]\nprotocol = "tcp"\n'
    )
    config = TransferConfig.from_toml(path)
    assert config.transport == "mooncake"
    assert config.waiting_timeout == 30.0
    assert config.transport_options == {"protocol": "tcp"}


def test_from_toml_reports_broken_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("transport = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TransferConfig.from_toml(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        TransferConfig.from_toml(tmp_path / "missing.toml")


def test_from_env_overrides_a_base_config() -> None:
    env = {
        "KVBRIDGE_TRANSPORT": "nixl",
        "KVBRIDGE_TRANSPORT_OPTIONS": '{"backend": "UCX"}',
        "KVBRIDGE_DEBUG_LOCKSTEP": "yes",
        "KVBRIDGE_HEARTBEAT_MAX_MISSES": "4",
    }
    base = TransferConfig(waiting_timeout=7.0)
    config = TransferConfig.from_env(env, base=base)
    assert config.transport == "nixl"
    assert config.transport_options == {"backend": "UCX"}
    assert config.debug_lockstep is True
    assert config.heartbeat_max_misses == 4
    assert config.waiting_timeout == 7.0


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("KVBRIDGE_WAITING_TIMEOUT", "abc"),
        ("KVBRIDGE_DEBUG_LOCKSTEP", "maybe"),
        ("KVBRIDGE_TRANSPORT_OPTIONS", "{not json"),
    ],
)
def test_from_env_names_the_bad_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        TransferConfig.from_env({var: value})


values = (
    st.none()
    | st.integers()
    | st.text(max_size=5)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)


@given(
    st.dictionaries(
        st.sampled_from(TransferConfig.field_names()) | st.text(max_size=12), values, max_size=5
    )
)
def test_from_dict_raises_config_error_or_builds_a_valid_config(data: dict) -> None:
    try:
        config = TransferConfig.from_dict(data)
    except ConfigError:
        return
    # Whatever was accepted must round-trip and keep its types.
    assert TransferConfig.from_dict(config.to_dict()) == config
    assert isinstance(config.waiting_timeout, float) and config.waiting_timeout > 0
    assert isinstance(config.debug_lockstep, bool)
