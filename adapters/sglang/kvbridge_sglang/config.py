"""kvbridge-sglang's settings, from the environment (SGLang has no flag for them).

- ``KVBRIDGE_SGLANG_CONFIG``: a TOML file; its ``[kvbridge]`` table (or the whole file) is
  :class:`kvbridge.TransferConfig` (``transport``, timeouts, ``bind_host``, ...), and an
  optional ``[sglang]`` table holds this adapter's own keys (``poll_interval``,
  ``lookup_wait``).
- ``KVBRIDGE_<FIELD>`` variables override single fields (``KVBRIDGE_TRANSPORT=mooncake``,
  ``KVBRIDGE_HEARTBEAT_INTERVAL=1``, ``KVBRIDGE_SECRET``...), and
  ``KVBRIDGE_SGLANG_POLL_INTERVAL`` the poll interval, ``KVBRIDGE_SGLANG_LOOKUP_WAIT`` the
  lookup wait.

Every prefill and decode process reads the same variables, so set them once for the server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
import tomllib

from kvbridge import TransferConfig
from kvbridge.errors import ConfigError

CONFIG_ENV = "KVBRIDGE_SGLANG_CONFIG"
POLL_ENV = "KVBRIDGE_SGLANG_POLL_INTERVAL"
LOOKUP_WAIT_ENV = "KVBRIDGE_SGLANG_LOOKUP_WAIT"
_ADAPTER_KEYS = {"poll_interval", "lookup_wait"}


@attrs.frozen
class AdapterConfig:
    transfer: TransferConfig
    #: Seconds between protocol steps of the driver thread while rooms are live.
    poll_interval: float = 0.001
    #: Seconds SGLang's scheduler thread waits for a new prefill's bootstrap answer before it
    #: moves on (SGLang asks again a second later): loopback and LAN answers take milliseconds.
    lookup_wait: float = 0.05

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AdapterConfig:
        environ = os.environ if environ is None else environ
        base = TransferConfig()
        adapter: dict[str, Any] = {}
        path = environ.get(CONFIG_ENV)
        if path:
            try:
                with open(path, "rb") as f:
                    document = tomllib.load(f)
            except OSError as exc:
                raise ConfigError(f"{CONFIG_ENV}={path}: cannot read it: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{CONFIG_ENV}={path} is not valid TOML: {exc}") from exc
            adapter = dict(document.pop("sglang", {}) or {})
            unknown = set(adapter) - _ADAPTER_KEYS
            if unknown:
                raise ConfigError(
                    f"{CONFIG_ENV}={path}: unknown keys in [sglang]: {sorted(unknown)}; "
                    f"expected {sorted(_ADAPTER_KEYS)}"
                )
            table = document.get("kvbridge", document)
            try:
                base = TransferConfig.from_dict(table)
            except ConfigError as exc:
                raise ConfigError(f"{CONFIG_ENV}={path}: {exc}") from exc
        transfer = TransferConfig.from_env(environ, base=base)
        poll = _seconds(environ, POLL_ENV, adapter, "poll_interval", 0.001)
        if not 0 < poll <= 1:
            raise ConfigError(f"{POLL_ENV} must be in (0, 1] seconds, got {poll}")
        lookup_wait = _seconds(environ, LOOKUP_WAIT_ENV, adapter, "lookup_wait", 0.05)
        if not 0 <= lookup_wait <= 5:
            raise ConfigError(f"{LOOKUP_WAIT_ENV} must be in [0, 5] seconds, got {lookup_wait}")
        return cls(transfer=transfer, poll_interval=poll, lookup_wait=lookup_wait)


def _seconds(
    environ: Mapping[str, str], env: str, adapter: Mapping[str, Any], key: str, default: float
) -> float:
    raw = environ.get(env, adapter.get(key, default))
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{env} (or [sglang] {key}) = {raw!r} is not a number of seconds"
        ) from None
