from __future__ import annotations

from pathlib import Path

import pytest

from kvbridge.errors import ConfigError
from kvbridge_sglang.config import AdapterConfig
from kvbridge_sglang.plugin import add_enum_member
from kvbridge_sglang.version import Unsupported, check_server_args, check_version


def test_environment_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "kvbridge.toml"
    toml.write_text('[kvbridge]\ntransport = "mooncake"\nwaiting_timeout = 9\n[sglang]\n'
                    "poll_interval = 0.01\nlookup_wait = 0.2\n")  # fmt: skip
    config = AdapterConfig.from_env(
        {"KVBRIDGE_SGLANG_CONFIG": str(toml), "KVBRIDGE_WAITING_TIMEOUT": "3"}
    )
    assert config.transfer.transport == "mooncake"
    assert config.transfer.waiting_timeout == 3.0  # the variable wins over the file
    assert config.poll_interval == 0.01
    assert config.lookup_wait == 0.2
    assert AdapterConfig.from_env({"KVBRIDGE_SGLANG_LOOKUP_WAIT": "0"}).lookup_wait == 0
    assert AdapterConfig.from_env({}).transfer.transport == "fake"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KVBRIDGE_SGLANG_CONFIG": "/nonexistent.toml"}, "cannot read it"),
        ({"KVBRIDGE_SGLANG_POLL_INTERVAL": "soon"}, "not a number"),
        ({"KVBRIDGE_SGLANG_POLL_INTERVAL": "5"}, r"\(0, 1\]"),
        ({"KVBRIDGE_SGLANG_LOOKUP_WAIT": "-1"}, r"LOOKUP_WAIT must be in \[0, 5\]"),
        ({"KVBRIDGE_SGLANG_LOOKUP_WAIT": "later"}, "not a number"),
        ({"KVBRIDGE_HEARTBEAT_INTERVAL": "x"}, "KVBRIDGE_HEARTBEAT_INTERVAL"),
    ],
)
def test_bad_settings_name_what_to_change(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AdapterConfig.from_env(environ)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("[sglang]\nspeed = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown keys in \[sglang\]"):
        AdapterConfig.from_env({"KVBRIDGE_SGLANG_CONFIG": str(toml)})


def test_untested_versions_are_refused_naming_the_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert check_version("0.5.23") == "0.5.23"
    with pytest.raises(Unsupported, match="KVBRIDGE_SGLANG_ALLOW_UNTESTED=1"):
        check_version("0.5.24")
    monkeypatch.setenv("KVBRIDGE_SGLANG_ALLOW_UNTESTED", "1")
    assert check_version("0.6.0rc1") == "0.6.0rc1"


def test_unsupported_server_settings_name_the_flag() -> None:
    class Args:
        pp_size = 2
        enable_dp_attention = True
        dp_size = 2
        speculative_algorithm = None

    with pytest.raises(Unsupported, match=r"--pp-size 1.*--dp-size 1"):
        check_server_args(Args())


def test_a_member_joins_a_closed_enum() -> None:
    import enum

    class Backend(enum.Enum):
        A = "a"

    member = add_enum_member(Backend, "KVB", "kvb")
    assert Backend("kvb") is member is Backend.KVB and list(Backend)[-1] is member
    assert add_enum_member(Backend, "KVB", "kvb") is member
