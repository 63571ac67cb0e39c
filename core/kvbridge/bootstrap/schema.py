"""What a bootstrap server holds and answers, as checks of parsed JSON: no I/O.

The server checks every registration with :func:`validate_registration` before it stores it;
decode checks every ``/v1/info`` answer with :func:`validate_info` before it plans a room with
it (an answer comes over the network, so it is untrusted like any other input).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

SIZE_KEYS = ("dp_size", "pp_size", "cp_size", "tp_size")
RANK_KEYS = ("dp_rank", "pp_rank", "cp_rank", "tp_rank")
#: Must be identical across the ranks of one prefill instance.
SHARED_KEYS = (
    "page_bytes",
    "page_size",
    "kv_dtype",
    "kv_layout",
    "api_version",
    "transport",
    "num_kv_regions",
)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _int_field(data: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 20) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in [{lo}, {hi}], got {short(value)}")
    return value


def _str_field(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise BadRequest(f"{key} must be a non-empty string of at most 1024 characters")
    return value


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def parse_control(address: Any) -> tuple[str, int]:
    """Validate a control-channel address ``tcp://host:port``; return ``(host, port)``.

    ``host`` is an IPv4 address, a bracketed IPv6 address or a DNS name; wildcard addresses
    (``*``, ``0.0.0.0``, ``::``) are refused because nobody can connect to them. ``port`` is
    1..65535. Raises :class:`BadRequest` naming what is wrong.
    """
    if not isinstance(address, str) or not address.startswith("tcp://") or len(address) > 270:
        raise BadRequest(f"control must be 'tcp://host:port', got {short(address)}")
    rest = address[len("tcp://") :]
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise BadRequest(f"control {short(address)} has no host:port")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest(f"control {short(address)}: port must be 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise BadRequest(f"control {short(address)}: bad IPv6 address") from None
    else:
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            if not host.isascii() or len(host) > 253 or not _HOSTNAME.match(host):
                raise BadRequest(f"control {short(address)}: bad host name") from None
            if host.replace(".", "").isdigit():
                raise BadRequest(f"control {short(address)}: bad IPv4 address") from None
            return host, int(port_text)
    if ip.is_unspecified or ip.is_multicast:
        raise BadRequest(f"control {short(address)}: {ip} is not a connectable address")
    return host, int(port_text)


def json_depth(value: Any) -> int:
    """Deepest nesting of lists and dicts in a parsed JSON value (iterative: no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item if isinstance(child, (list, dict)))
    return deepest


def validate_registration(
    data: Any, *, max_ranks: int = 4096, max_endpoint_bytes: int = 16 * 1024
) -> dict[str, Any]:
    """One rank's registration, checked field by field; :class:`BadRequest` names what is
    wrong."""
    if not isinstance(data, dict):
        raise BadRequest("registration must be a JSON object")
    entry: dict[str, Any] = {}
    for key in SIZE_KEYS:
        entry[key] = _int_field(data, key, 1, 4096)
    total = entry["dp_size"] * entry["pp_size"] * entry["cp_size"] * entry["tp_size"]
    if total > max_ranks:
        raise BadRequest(
            f"dp_size*pp_size*cp_size*tp_size is {total}, more than the {max_ranks} "
            "ranks this bootstrap server accepts"
        )
    for key, size in zip(RANK_KEYS, SIZE_KEYS):
        entry[key] = _int_field(data, key, 0, entry[size] - 1)
    entry["page_bytes"] = _int_field(data, "page_bytes", 1, 1 << 40)
    entry["page_size"] = _int_field(data, "page_size", 1, 1 << 20)
    entry["num_kv_regions"] = _int_field(data, "num_kv_regions", 1, 1 << 20)
    for key in ("control", "kv_dtype", "kv_layout", "api_version", "transport"):
        entry[key] = _str_field(data, key)
    parse_control(entry["control"])
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, dict):
        raise BadRequest("endpoint must be a JSON object (the transport's endpoint)")
    endpoint_bytes = len(json.dumps(endpoint, separators=(",", ":")))
    if endpoint_bytes > max_endpoint_bytes:
        raise BadRequest(
            f"endpoint is {endpoint_bytes} bytes of JSON, more than {max_endpoint_bytes}"
        )
    entry["endpoint"] = endpoint
    entry["authoritative"] = entry["cp_rank"] == 0
    unknown = sorted(set(data) - set(entry) - {"authoritative"})
    if unknown:
        raise BadRequest(f"unknown registration field(s): {short(', '.join(unknown))}")
    return entry


#: Deepest nesting accepted in a ``/v1/info`` answer (what a server stores is at most its
#: ``max_json_depth``, 32, below the rank list).
MAX_INFO_DEPTH = 40


def validate_info(data: Any, *, max_ranks: int = 4096) -> dict[str, Any]:
    """A ``/v1/info`` answer, checked: its sizes, and every rank as the server checks a
    registration, agreeing with those sizes and the shared fields. Returns the checked copy;
    :class:`BadRequest` names what is wrong."""
    if not isinstance(data, dict):
        raise BadRequest(f"info must be a JSON object, got {short(data)}")
    # Before anything walks it: the checks below recurse (comparing, encoding an endpoint).
    if json_depth(data) > MAX_INFO_DEPTH:
        raise BadRequest(f"info is nested more than {MAX_INFO_DEPTH} deep")
    sizes = data.get("sizes")
    if not isinstance(sizes, dict):
        raise BadRequest(f"info sizes must be a JSON object, got {short(sizes)}")
    checked_sizes = {key: _int_field(sizes, key, 1, 4096) for key in SIZE_KEYS}
    ranks = data.get("ranks")
    if not isinstance(ranks, list) or not 0 < len(ranks) <= max_ranks:
        raise BadRequest(f"info ranks must be a list of 1 to {max_ranks} ranks")
    entries = [validate_registration(rank, max_ranks=max_ranks) for rank in ranks]
    for entry in entries:
        for key in (*SIZE_KEYS, *SHARED_KEYS):
            mine = checked_sizes[key] if key in checked_sizes else data.get(key)
            if entry[key] != mine:
                raise BadRequest(
                    f"info rank {[entry[k] for k in RANK_KEYS]} has {key} {short(entry[key])}, "
                    f"the instance {short(mine)}"
                )
    instance = data.get("instance")
    if not isinstance(instance, str) or len(instance) > 1024:
        raise BadRequest(f"info instance must be a string, got {short(instance)}")
    return {
        "instance": instance,
        "generation": _int_field(data, "generation", 0, 1 << 62),
        "sizes": checked_sizes,
        **{key: entries[0][key] for key in SHARED_KEYS},
        "ranks": entries,
    }
