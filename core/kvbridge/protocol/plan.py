"""Who writes a room, as values: prefill keys, the write plan, and each side's view of the other.

A decode rank plans each room once it knows the prefill's registered ranks
(:func:`plan_for`, from a bootstrap server's ``/v1/info`` answer): which prefill ranks write
into it (:attr:`PrefillTarget.controls`, the only senders whose completions count, rule 9),
and which prefill ranks it sends metadata to and with which page slice
(:attr:`PrefillTarget.plan`). A prefill rank sees the decode ranks as :class:`DecodePeer`
and each one's metadata as :class:`DecodeMetadata`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import numpy as np

from kvbridge.errors import ConfigError
from kvbridge.protocol.mapping import AUTHORITATIVE_CP_RANK, Route, routes, sources_of, targets_of
from kvbridge.types import Endpoint, MemoryRegion

_KEY = re.compile(r"(?P<addr>.+)/dp(?P<dp>\d{1,9})/tp(?P<tp>\d{1,9})")


@attrs.frozen
class PrefillKey:
    """A prefill rank's name: its instance's bootstrap address, DP rank and TP rank.

    On the wire (``Status.prefill_key``, ``Heartbeat``) it travels as ``str(key)``,
    ``host:port/dp<d>/tp<t>``.
    """

    addr: str
    dp_rank: int
    tp_rank: int

    def __str__(self) -> str:
        return f"{self.addr}/dp{self.dp_rank}/tp{self.tp_rank}"

    @classmethod
    def parse(cls, text: str) -> PrefillKey:
        """The key ``text`` names; ValueError if it names none."""
        match = _KEY.fullmatch(text)
        if match is None:
            raise ValueError(f"not a prefill key (host:port/dp<d>/tp<t>): {text!r:.80}")
        return cls(match["addr"], int(match["dp"]), int(match["tp"]))


@attrs.frozen
class Contact:
    """A prefill rank this decode rank sends metadata to, for one (address, DP rank)."""

    prefill_key: str
    control: str
    #: How many decode ranks send this prefill rank metadata for each room.
    expected: int
    #: The page slice it writes into this decode rank; None: it writes nothing, only takes part.
    route: Route | None


@attrs.frozen
class PrefillTarget:
    """The prefill ranks that write one room into this decode rank (from rank mapping)."""

    peers: tuple[Endpoint, ...]
    #: Keys identifying the peers in completion messages (parallel to ``peers``).
    controls: tuple[Any, ...] = ()
    #: The prefill ranks to send metadata to (:class:`Contact`); opaque to the sessions.
    plan: Any = None
    #: The prefill instance serving the room, for liveness.
    bootstrap_addr: str = ""


@attrs.frozen
class PeerBounds:
    """What a metadata check needs of a decode rank's registered memory (None: no regions)."""

    kv_pages: int | None
    kv_page_bytes: int | None
    aux_rows: int | None
    aux_row_bytes: tuple[int, ...]

    @classmethod
    def of(
        cls, kv_regions: tuple[MemoryRegion, ...], aux_regions: tuple[MemoryRegion, ...]
    ) -> PeerBounds:
        return cls(
            min((r.num_items for r in kv_regions), default=None),
            min((r.item_bytes for r in kv_regions), default=None),
            min((r.num_items for r in aux_regions), default=None),
            tuple(r.item_bytes for r in aux_regions),
        )


def _peer_bounds(peer: DecodePeer) -> PeerBounds:
    return PeerBounds.of(peer.kv_regions, peer.aux_regions)


@attrs.frozen
class DecodePeer:
    """A decode rank as a prefill rank sees it: where its memory is and how to reach it."""

    endpoint: Endpoint
    kv_regions: tuple[MemoryRegion, ...]
    aux_regions: tuple[MemoryRegion, ...]
    control: Any = None
    #: Computed once: every room's metadata from this rank is checked against it.
    bounds: PeerBounds = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_peer_bounds, takes_self=True)
    )


@attrs.frozen(eq=False)
class DecodeMetadata:
    """Where one decode rank wants one room's KV: sent by decode after allocation."""

    room: int
    decode_rank: Any
    pages: np.ndarray
    aux_slot: int
    #: How many decode ranks send metadata for this room to this prefill rank.
    expected: int = 1
    #: ``(src_offset, dst_offset, length)`` of each page this rank writes; None = whole pages.
    page_slice: tuple[int, int, int] | None = None
    #: False when this prefill rank writes nothing for the room and only takes part.
    writes: bool = True


def _transfer_ranks(info: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    """The ranks of a ``/v1/info`` answer that take part in transfers (authoritative CP rank,
    first pipeline stage)."""
    return (r for r in info["ranks"] if r["cp_rank"] == AUTHORITATIVE_CP_RANK and r["pp_rank"] == 0)


def plan_for(
    addr: str,
    info: Mapping[str, Any],
    dp: int,
    *,
    decode_rank: int,
    decode_tp: int,
    decode_page_bytes: int,
) -> PrefillTarget | str:
    """The plan of a room served by DP rank ``dp`` of the prefill at ``addr``, whose bootstrap
    server answered ``info``; a string says why no plan can exist."""
    dp_size = info["sizes"]["dp_size"]
    if not 0 <= dp < dp_size:
        return f"prefill DP rank {dp} out of range for {addr} (dp_size {dp_size})"
    ranks = {r["tp_rank"]: r for r in _transfer_ranks(info) if r["dp_rank"] == dp}
    prefill_tp = info["sizes"]["tp_size"]
    if set(ranks) != set(range(prefill_tp)):
        listed = sorted(ranks)
        return f"prefill {addr} lists TP ranks {listed} of DP rank {dp}, not 0..{prefill_tp - 1}"
    try:
        all_routes = routes(
            prefill_tp, decode_tp, info["page_bytes"], decode_page_bytes, info["kv_layout"]
        )
    except ConfigError as exc:
        return f"prefill {addr} cannot feed this decode: {exc}"
    contacts = []
    for p in range(prefill_tp):
        out = targets_of(p, all_routes)
        key = str(PrefillKey(addr, dp, p))
        mine = [r for r in out if r.decode == decode_rank]
        if mine:
            contacts.append(Contact(key, ranks[p]["control"], len(out), mine[0]))
        elif not out and p % decode_tp == decode_rank:
            contacts.append(Contact(key, ranks[p]["control"], 1, None))  # takes part only
    sources = sources_of(decode_rank, all_routes)
    return PrefillTarget(
        peers=tuple(ranks[r.prefill]["endpoint"] for r in sources),
        controls=tuple(str(PrefillKey(addr, dp, r.prefill)) for r in sources),
        plan=tuple(contacts),
        bootstrap_addr=addr,
    )


def registered_control(info: Mapping[str, Any], key: PrefillKey) -> str | None:
    """The control address the prefill rank ``key`` registered, in a ``/v1/info`` answer."""
    for r in _transfer_ranks(info):
        if r["dp_rank"] == key.dp_rank and r["tp_rank"] == key.tp_rank:
            return str(r["control"])
    return None


def transfer_controls(info: Mapping[str, Any]) -> list[str]:
    """Control addresses of every transferring prefill rank in a ``/v1/info`` answer."""
    return sorted({str(r["control"]) for r in _transfer_ranks(info)})


def by_control(rooms: Iterable[tuple[int, PrefillTarget]]) -> dict[str, list[int]]:
    """Rooms grouped by each prefill rank their plans send metadata to (one message each)."""
    out: dict[str, list[int]] = {}
    for room, target in rooms:
        for contact in target.plan:
            out.setdefault(contact.control, []).append(room)
    return out


def pages_decode_needs(
    pages: np.ndarray, start: int, total: int, requested: int | None
) -> np.ndarray | str:
    """Which of a prompt chunk's pages to send: ``pages`` are the prompt's pages
    ``[start, start + len(pages))`` of ``total``, ``requested`` how many pages decode
    allocated (None: not known, so all of them).

    Decode asks for fewer when its own prefix cache holds the prompt's first pages: then only
    the last ``requested`` pages of the prompt go, and a chunk wholly inside decode's prefix
    sends nothing. More than the prompt has is no plan at all: the reason comes back instead
    (the caller aborts the room with it)."""
    if requested is None:
        return pages
    if requested > total:
        return f"decode allocated {requested} pages, this prefill holds {total} for the prompt"
    skip = total - requested  # decode holds the first ``skip`` pages already
    return pages[skip - start :] if start < skip else pages
