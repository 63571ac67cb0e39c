"""The shared secret: loaded from the environment or a file, never shown.

One secret per deployment authenticates both the bootstrap server (an HTTP bearer token) and
every control-channel frame (an HMAC key). Both are *derived* from the secret with distinct
labels, so neither the token, which travels in HTTP headers, nor a MAC reveals the other key or
the secret itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from kvbridge.errors import ConfigError

#: Environment variables read by :meth:`Secret.from_env` (the value, or a path to a file).
ENV_SECRET = "KVBRIDGE_SECRET"
ENV_SECRET_FILE = "KVBRIDGE_SECRET_FILE"
MIN_SECRET_BYTES = 16
_MAX_SECRET_BYTES = 4096


class Secret:
    """Secret bytes whose ``repr``/``str`` never show them; compared in constant time."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        raw = raw.strip()
        if len(raw) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the kvbridge secret must be at least {MIN_SECRET_BYTES} bytes "
                f"(got {len(raw)}); generate one with: python -c 'import secrets; "
                f"print(secrets.token_hex(32))'"
            )
        if len(raw) > _MAX_SECRET_BYTES:
            raise ConfigError(f"the kvbridge secret must be at most {_MAX_SECRET_BYTES} bytes")
        self._value = raw

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Secret:
        try:
            data = Path(path).read_bytes()[: _MAX_SECRET_BYTES + 2]
        except OSError as exc:
            raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
        return cls(data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Secret | None:
        """``KVBRIDGE_SECRET`` (the value) or ``KVBRIDGE_SECRET_FILE`` (a path); None if unset."""
        environ = os.environ if environ is None else environ
        value, path = environ.get(ENV_SECRET), environ.get(ENV_SECRET_FILE)
        if value and path:
            raise ConfigError(f"set {ENV_SECRET} or {ENV_SECRET_FILE}, not both")
        if value:
            return cls(value)
        if path:
            return cls.from_file(path)
        return None

    def derive(self, label: str) -> bytes:
        """A 32-byte key for one purpose (``"control"``, ``"bootstrap"``)."""
        return hmac.new(self._value, b"kvbridge/" + label.encode(), hashlib.sha256).digest()

    @property
    def bootstrap_token(self) -> str:
        return self.derive("bootstrap").hex()

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self.derive("hash"))

    def __reduce__(self) -> tuple[type[Secret], tuple[bytes]]:
        # Spawned worker processes receive the config by pickling; the secret goes with it
        # through the process pipe, never through a command line.
        return (Secret, (self._value,))
