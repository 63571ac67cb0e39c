"""SGLang's plugin entry point: makes ``--disaggregation-transfer-backend kvbridge`` exist.

SGLang's transfer backends are a closed list (an argparse choice list, the ``TransferBackend``
enum and an if/elif in ``get_kv_class``). SGLang loads ``sglang.srt.plugins`` entry points in
every process before it parses arguments (``SGLANG_PLUGINS`` may restrict which), then applies
the hooks plugins registered. :func:`register` is that entry point, and the only place that
touches SGLang's internals:

1. adds the ``kvbridge`` choice to the transfer-backend flag;
2. adds the ``KVBRIDGE`` member to ``TransferBackend`` (enums have no API for it);
3. wraps ``get_kv_class`` so the kvbridge backend gets kvbridge's classes
   (:mod:`kvbridge_sglang.conn`) and every other backend SGLang's own;
4. on decode, answers a request that has a ``bootstrap_room`` but no ``bootstrap_host`` with
   :data:`~kvbridge_sglang.rooms.NO_BOOTSTRAP_HOST` instead of letting SGLang's address
   helper raise in the scheduler loop (which takes the whole decode server down); the
   receiver then fails that one request, saying what is missing;
5. on decode, makes SGLang's deferred release of an aborted request's pages wait for
   kvbridge's fence without a timeout (unless ``SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_
   RELEASE_TIMEOUT`` is set), so a late write never lands in reused pages.

The SGLang version is checked when a kvbridge manager or bootstrap server is built (a refusal
there names the override); here an untested version is only logged, so SGLang still starts for
the other backends.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kvbridge_sglang.version import Unsupported, check_version

log = logging.getLogger("kvbridge_sglang")
BACKEND = "kvbridge"
MEMBER = "KVBRIDGE"
TIMEOUT_ENV = "SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE_TIMEOUT"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    try:
        check_version()
    except Unsupported as exc:
        log.warning("%s (the kvbridge backend will refuse to start)", exc)
    from sglang.srt.arg_groups.choices import add_disagg_transfer_backend_choices
    from sglang.srt.disaggregation import utils
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in _choices():
        add_disagg_transfer_backend_choices([BACKEND])
    member = add_enum_member(utils.TransferBackend, MEMBER, BACKEND)
    HookRegistry.register(
        "sglang.srt.disaggregation.utils.get_kv_class", _kv_class_lookup(member), HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.disaggregation.decode._bootstrap_addr", _address_or_sentinel, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.disaggregation.decode.DecodeTransferQueue.__init__",
        _fence_without_timeout,
        HookType.AFTER,
    )
    _registered = True


def _choices() -> list[str]:
    from sglang.srt.arg_groups import choices

    return list(getattr(choices, "DISAGG_TRANSFER_BACKEND_CHOICES", []))


def add_enum_member(enum_class: Any, name: str, value: str) -> Any:
    """Add ``name = value`` to a closed ``enum.Enum`` (idempotent); returns the member."""
    existing = enum_class._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = object.__new__(enum_class)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_class
    member.__init__(value)
    type.__setattr__(enum_class, name, member)
    enum_class._member_map_[name] = member
    enum_class._value2member_map_[value] = member
    enum_class._member_names_.append(name)
    return member


def _kv_class_lookup(member: Any) -> Any:
    def lookup(original: Any, transfer_backend: Any, class_type: Any, *args: Any, **kw: Any) -> Any:
        if transfer_backend is not member and getattr(transfer_backend, "value", None) != BACKEND:
            return original(transfer_backend, class_type, *args, **kw)
        from sglang.srt.disaggregation.utils import KVClassType

        if class_type == KVClassType.KVARGS:
            return original(transfer_backend, class_type, *args, **kw)
        from kvbridge_sglang import conn

        return {
            KVClassType.MANAGER: conn.KvbridgeKVManager,
            KVClassType.SENDER: conn.KvbridgeKVSender,
            KVClassType.RECEIVER: conn.KvbridgeKVReceiver,
            KVClassType.BOOTSTRAP_SERVER: conn.KvbridgeKVBootstrapServer,
        }[class_type]

    return lookup


def _address_or_sentinel(original: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(req, "bootstrap_host", None) is None and _backend() == BACKEND:
        from kvbridge_sglang.rooms import NO_BOOTSTRAP_HOST

        return NO_BOOTSTRAP_HOST
    return original(req, *args, **kwargs)


def _backend() -> str | None:
    try:
        from sglang.srt.runtime_context import get_disagg

        return str(get_disagg().disaggregation_transfer_backend)
    except Exception:  # an SGLang without this runtime context: leave its behaviour alone
        return None


def _fence_without_timeout(result: Any, queue: Any, *args: Any, **kwargs: Any) -> None:
    if _backend() != BACKEND:
        return
    if not getattr(queue, "enable_deferred_kv_release", True):
        log.warning(
            "SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE is off: SGLang reuses an aborted "
            "request's pages at once, so a prefill's late write can land in another request's "
            "KV; kvbridge's fence needs it on"
        )
    if TIMEOUT_ENV not in os.environ:
        from kvbridge_sglang.conn import deferred_release_timeout

        queue.deferred_kv_release_timeout = deferred_release_timeout()
