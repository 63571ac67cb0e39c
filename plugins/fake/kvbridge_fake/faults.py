"""Fault injection for the Fake transport, from ``transport_options["faults"]`` or the
``KVBRIDGE_FAKE_FAULTS`` environment variable (JSON; it overrides the config)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import attrs

from kvbridge.errors import ConfigError

ENV_FAULTS = "KVBRIDGE_FAKE_FAULTS"
DELAYABLE_OPS = ("init", "send")


def _ranks(value: Any) -> frozenset[int] | None:
    return None if value is None else frozenset(int(v) for v in value)


@attrs.frozen
class FaultPlan:
    """What to break, and on which TP ranks (``None`` = every rank).

    - ``delay``: seconds by operation (``init``: connecting takes that long; ``send``: each
      chunk lands that much later), on ``delay_ranks``.
    - ``fail_rooms``: these rooms report Failed on ``fail_ranks``.
    - ``aux_delay``: aux rows land this many seconds late on ``aux_delay_ranks``; with
      ``ack_before_aux`` the write is acknowledged (so the sender reports completion) first.
    - ``gone_ranks``: these ranks' listeners drop every incoming write (a vanished peer).
    - ``discard_kv_ranks``: these ranks' listeners accept incoming KV page writes but throw
      the bytes away; aux rows still land, so the room completes. A control for engine tests:
      what a receiver computes without the transferred KV.
    - ``discard_kv_rooms``: the same for these rooms only (on every rank): KV that did not
      arrive intact while the room still completes, for tests of what an engine does then.
    """

    delay: Mapping[str, float] = attrs.field(factory=dict, hash=False)
    delay_ranks: frozenset[int] | None = attrs.field(default=None, converter=_ranks)
    fail_rooms: frozenset[int] = attrs.field(factory=frozenset, converter=frozenset)
    fail_ranks: frozenset[int] | None = attrs.field(default=None, converter=_ranks)
    aux_delay: float = 0.0
    aux_delay_ranks: frozenset[int] | None = attrs.field(default=None, converter=_ranks)
    ack_before_aux: bool = False
    gone_ranks: frozenset[int] = attrs.field(factory=frozenset, converter=frozenset)
    discard_kv_ranks: frozenset[int] = attrs.field(factory=frozenset, converter=frozenset)
    discard_kv_rooms: frozenset[int] = attrs.field(factory=frozenset, converter=frozenset)

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> FaultPlan:
        environ = os.environ if environ is None else environ
        data: dict[str, Any] = dict(options.get("faults") or {})
        raw = environ.get(ENV_FAULTS)
        if raw:
            try:
                data.update(json.loads(raw))
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{ENV_FAULTS} must be a JSON object: {exc}") from exc
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown fake fault(s) {unknown}; known: {sorted(known)}")
        bad_ops = sorted(set(data.get("delay", {})) - set(DELAYABLE_OPS))
        if bad_ops:
            raise ConfigError(f"fake faults: cannot delay {bad_ops}; delayable: {DELAYABLE_OPS}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid fake faults {data}: {exc}") from exc

    def delay_for(self, op: str, tp_rank: int) -> float:
        if self.delay_ranks is not None and tp_rank not in self.delay_ranks:
            return 0.0
        return float(self.delay.get(op, 0.0))

    def fails(self, room: int, tp_rank: int) -> bool:
        return room in self.fail_rooms and (self.fail_ranks is None or tp_rank in self.fail_ranks)

    def discards_kv(self, room: int, tp_rank: int) -> bool:
        return tp_rank in self.discard_kv_ranks or room in self.discard_kv_rooms

    def aux_delay_on(self, tp_rank: int) -> float:
        if self.aux_delay_ranks is not None and tp_rank not in self.aux_delay_ranks:
            return 0.0
        return self.aux_delay
