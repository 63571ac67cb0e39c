"""TransferConfig: how an engine configures kvbridge, from code, a dict, TOML or the environment."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from kvbridge.errors import ConfigError
from kvbridge.secret import ENV_SECRET, Secret

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "KVBRIDGE_"


def _positive_number(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be > 0, got {value!r}")


def _transport_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or not value.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"transport must be a plugin name like 'fake', got {value!r}")


def _secret_type(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, Secret):
        raise ConfigError(
            "secret must be a kvbridge.secret.Secret; put the value in secret_file or the "
            "KVBRIDGE_SECRET environment variable, never in config data"
        )


_WILDCARD = "0.0.0.0"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def _ipv4(value: object) -> bool:
    try:
        return isinstance(value, str) and ipaddress.ip_address(value).version == 4
    except ValueError:
        return False


def _bind_host(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _ipv4(value):
        raise ConfigError(
            f"bind_host must be an IPv4 address of a local interface (or 0.0.0.0 for all), "
            f"got {value!r}"
        )


def _advertise_host(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if value == _WILDCARD or not (
        _ipv4(value) or (isinstance(value, str) and _HOST_NAME.match(value))
    ):
        raise ConfigError(
            f"advertise_host must be an IPv4 address or host name peers can reach, got {value!r}"
        )


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"transport_options must be a mapping, got {type(value).__name__}")
    return dict(value)


@attrs.frozen
class TransferConfig:
    """Everything kvbridge needs to know from the engine, validated on construction.

    Times are in seconds. ``transport_options`` belongs to the selected transport (each plugin's
    README lists its keys).
    """

    transport: str = attrs.field(default="fake", validator=_transport_name)
    transport_options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_frozen_mapping, hash=False
    )
    #: Prefill fails a room whose decode never sent metadata within this time.
    bootstrap_timeout: float = attrs.field(default=300.0, validator=_positive_number)
    #: Decode fails a room whose transfer never completed within this time after send_metadata.
    waiting_timeout: float = attrs.field(default=300.0, validator=_positive_number)
    #: Prefill ranks send decode ranks a heartbeat this often (and decode checks bootstrap
    #: servers for restarts this often)...
    heartbeat_interval: float = attrs.field(default=5.0, validator=_positive_number)
    #: ...and decode fails a prefill rank's rooms after this many intervals of silence.
    heartbeat_max_misses: int = attrs.field(default=2, validator=_positive_number)
    #: An aborted room's memory stays quarantined until its prefill writers confirm they
    #: stopped; past this time that is logged and counted (the memory is still not reused).
    fence_timeout: float = attrs.field(default=60.0, validator=_positive_number)
    #: Prefill computes a checksum of each room's bytes and decode verifies it before the
    #: commit (costs a pass over the KV on both sides; see the README).
    verify_checksums: bool = False
    #: Bootstrap look-ups answered with a definitive error (4xx other than 503) are tried this
    #: often before the address fails; "starting" (503) and unreachable answers are retried
    #: with back-off until ``bootstrap_timeout`` instead.
    bootstrap_max_attempts: int = attrs.field(default=5, validator=_positive_number)
    #: Timeout of every bootstrap HTTP request (connect, send, answer), prefill and decode side.
    bootstrap_http_timeout: float = attrs.field(default=2.0, validator=_positive_number)
    #: Longest pause between two retries of a bootstrap look-up or registration (the pause
    #: doubles from 50 ms up to this).
    bootstrap_backoff_max: float = attrs.field(default=5.0, validator=_positive_number)
    #: A prefill address that failed is refused for this long, then tried again for new
    #: requests (so a restarted prefill serves again).
    bootstrap_retry_after: float = attrs.field(default=10.0, validator=_positive_number)
    #: Shared secret (see :mod:`kvbridge.secret`): authenticates the bootstrap server and
    #: every control frame. Never shown in ``repr``/``to_dict``; comes from ``secret_file`` or
    #: the ``KVBRIDGE_SECRET`` / ``KVBRIDGE_SECRET_FILE`` environment variables.
    secret: Secret | None = attrs.field(default=None, repr=False, validator=_secret_type)
    #: Path of a file holding the secret (read at construction unless ``secret`` is given).
    secret_file: str | None = None
    #: Check before every collective that all ranks hold identical queues (costs a collective).
    debug_lockstep: bool = False
    #: IPv4 address this rank's listeners bind: control receiver, the transport's listener
    #: (fake, mooncake, mori; NIXL/UCX picks interfaces itself). ``0.0.0.0`` binds every
    #: interface and then needs ``advertise_host``. Node ``host=`` arguments override it.
    bind_host: str = attrs.field(default="127.0.0.1", validator=_bind_host)
    #: Address (IPv4 or host name) peers are told to connect to; ``None``: ``bind_host``.
    advertise_host: str | None = attrs.field(default=None, validator=_advertise_host)

    def __attrs_post_init__(self) -> None:
        if self.bind_host == _WILDCARD and self.advertise_host is None:
            raise ConfigError(
                "bind_host 0.0.0.0 listens on every interface: set advertise_host to the "
                "address peers should connect to"
            )
        if self.secret is None and self.secret_file is not None:
            object.__setattr__(self, "secret", Secret.from_file(self.secret_file))

    @property
    def advertised_host(self) -> str:
        """The host peers connect to: ``advertise_host``, else ``bind_host``."""
        return self.advertise_host or self.bind_host

    @property
    def bootstrap_token(self) -> str | None:
        """The bearer token for the bootstrap server, derived from the secret (None: open)."""
        return self.secret.bootstrap_token if self.secret is not None else None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(a.name for a in attrs.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransferConfig:
        """Build from a mapping; unknown keys are an error that lists the known ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        if "secret" in data:
            raise ConfigError(
                "the secret is never taken from config data: use secret_file or the "
                f"{ENV_SECRET} environment variable"
            )
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(cls.field_names())}"
            )
        values = {name: _coerce(name, value) for name, value in data.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TransferConfig:
        """Read a TOML file: the ``[kvbridge]`` table if there is one, else the top level."""
        try:
            with Path(path).open("rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        table = document.get("kvbridge", document)
        return cls.from_dict(table)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: TransferConfig | None = None
    ) -> TransferConfig:
        """Override ``base`` (default: defaults) with ``KVBRIDGE_<FIELD>`` variables.

        ``KVBRIDGE_TRANSPORT_OPTIONS`` holds JSON; booleans accept 1/0/true/false/yes/no.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = attrs.asdict(base, recurse=False) if base else {}
        secret = values.pop("secret", None)
        for name in cls.field_names():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and name != "secret":
                values[name] = _parse_env(name, raw)
        from_env = Secret.from_env(environ)
        config = cls.from_dict(values)
        secret = from_env or secret
        return attrs.evolve(config, secret=secret) if secret is not None else config

    def to_dict(self) -> dict[str, Any]:
        """Every field but the secret itself (``secret_file`` is kept)."""
        data = attrs.asdict(self, recurse=False)
        data.pop("secret")
        data["transport_options"] = dict(self.transport_options)
        return data


_FIELD_TYPES = {
    "transport": str,
    "bootstrap_timeout": float,
    "waiting_timeout": float,
    "heartbeat_interval": float,
    "heartbeat_max_misses": int,
    "bootstrap_max_attempts": int,
    "bootstrap_http_timeout": float,
    "bootstrap_backoff_max": float,
    "bootstrap_retry_after": float,
    "debug_lockstep": bool,
    "fence_timeout": float,
    "verify_checksums": bool,
    "secret_file": str,
    "bind_host": str,
    "advertise_host": str,
}


def _coerce(name: str, value: Any) -> Any:
    expected = _FIELD_TYPES.get(name)
    if expected is None or (value is None and name in ("secret_file", "advertise_host")):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {expected.__name__}, got {value!r}")
    return value


def _parse_env(name: str, raw: str) -> Any:
    variable = ENV_PREFIX + name.upper()
    kind = _FIELD_TYPES.get(name)
    try:
        if name == "transport_options":
            return json.loads(raw)
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected 1/0/true/false/yes/no")
        if kind in (int, float):
            return kind(raw)
        return raw
    except ValueError as exc:
        raise ConfigError(f"{variable}={raw!r} is invalid: {exc}") from exc
