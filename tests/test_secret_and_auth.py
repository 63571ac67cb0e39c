"""The shared secret never shows, and sealed control frames resist tampering and replay."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbridge import ConfigError, TransferConfig
from kvbridge.protocol.auth import REPLAY_WINDOW_S, AuthError, Sealer, Verifier
from kvbridge.protocol.messages import MalformedFrame, Status, clean_text, decode, encode
from kvbridge.secret import Secret

VALUE = "s3cr3t-value-that-is-long-enough"
DEST = "tcp://127.0.0.1:5555"
NOW = 1_800_000_000_000


def test_secret_never_appears_in_repr_to_dict_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "secret"
    path.write_text(VALUE + "\n")
    config = TransferConfig(secret_file=str(path))
    assert config.secret == Secret(VALUE)
    with caplog.at_level(logging.DEBUG, logger="kvbridge"):
        logging.getLogger("kvbridge").info("config %r %s", config, config.secret)
    for text in (repr(config), str(config.to_dict()), caplog.text, repr(config.secret)):
        assert VALUE not in text
    assert "secret" not in config.to_dict() and config.to_dict()["secret_file"] == str(path)
    assert TransferConfig.from_dict(config.to_dict()) == config
    assert config.bootstrap_token is not None and VALUE not in config.bootstrap_token


def test_secret_comes_from_the_environment_not_from_config_data(tmp_path: Path) -> None:
    assert TransferConfig.from_env({"KVBRIDGE_SECRET": VALUE}).secret == Secret(VALUE)
    path = tmp_path / "s"
    path.write_text(VALUE)
    assert TransferConfig.from_env({"KVBRIDGE_SECRET_FILE": str(path)}).secret == Secret(VALUE)
    with pytest.raises(ConfigError, match="never taken from config data"):
        TransferConfig.from_dict({"secret": VALUE})
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Secret("short")
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        TransferConfig(secret_file=str(tmp_path / "missing"))


def test_a_pickled_config_keeps_its_secret_for_spawned_workers() -> None:
    config = TransferConfig(secret=Secret(VALUE))
    assert pickle.loads(pickle.dumps(config)).secret == config.secret


def test_bootstrap_command_takes_the_secret_from_the_environment_not_argv(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvbridge", "bootstrap", "--help"], capture_output=True, text=True
    )
    assert "--token " not in out.stdout
    assert "KVBRIDGE_SECRET" in out.stdout


def _sealed(sealer: Sealer, parts: list[bytes], dest: str = DEST, now: int = NOW) -> list[bytes]:
    return [*parts, sealer.seal(dest, parts, now)]


def test_sealed_frames_open_once_for_their_receiver_only() -> None:
    key = Secret(VALUE).derive("control")
    sealer, verifier = Sealer(key), Verifier(key, DEST)
    parts = encode(Status(5, "p", True))
    frame = _sealed(sealer, parts)
    assert verifier.open(frame, NOW) == parts
    with pytest.raises(AuthError, match="replayed"):
        verifier.open(frame, NOW)
    with pytest.raises(AuthError, match="bad frame MAC"):
        Verifier(key, "tcp://127.0.0.1:6666").open(_sealed(sealer, parts), NOW)
    with pytest.raises(AuthError, match="bad frame MAC"):
        Verifier(Secret("another secret, also long").derive("control"), DEST).open(
            _sealed(sealer, parts), NOW
        )
    with pytest.raises(AuthError, match="not authenticated"):
        verifier.open(parts, NOW)
    stale = _sealed(sealer, parts, now=NOW - int(REPLAY_WINDOW_S * 1000) - 1)
    with pytest.raises(AuthError, match="timestamp"):
        verifier.open(stale, NOW)


@given(st.integers(0, 3), st.integers(0, 63), st.integers(1, 255))
def test_any_flipped_bit_is_refused(part: int, position: int, mask: int) -> None:
    key = Secret(VALUE).derive("control")
    frame = _sealed(Sealer(key), encode(Status(9, "prefill-key", False, "why")))
    part = min(part, len(frame) - 1)
    data = bytearray(frame[part])
    data[position % len(data)] ^= mask
    frame[part] = bytes(data)
    with pytest.raises(AuthError):
        Verifier(key, DEST).open(frame, NOW)


def test_peer_text_is_cleaned_before_anyone_logs_or_shows_it() -> None:
    frames = encode(Status(3, "p", False, "\x1b[31mred\x1b[0m\x07" + "x" * 5000))
    reason = decode(frames).reason  # type: ignore[union-attr]
    assert reason is not None and "\x1b" not in reason and "\x07" not in reason
    assert len(reason) <= 1024
    assert clean_text("plain text") == "plain text"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_malformed_frame_not_a_crash(depth: int) -> None:
    with pytest.raises(MalformedFrame):
        decode([b"KVB\x02\x04", b"[" * depth + b"]" * depth])
