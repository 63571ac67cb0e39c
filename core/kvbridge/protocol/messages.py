"""Control-channel messages, who may send each, and their wire format (pure: no sockets here).

:data:`WHO_MAY_SEND` is rule 9's table: for every message the role that sends it and which of
that role's ranks a receiver accepts it from. A node drops, unread and counted, every message
its own role sends (:func:`refused_by`); the receiving machine checks the sender's standing
(:class:`Standing`). A new message is a class here, its row in the table, its codec below, and
its handling in the machine that receives it.

Rule 7's one bit ("this rank only followed another's failure") is encoded here only:
:meth:`Abort.of` and :meth:`Status.failed` build it, ``cause`` reads it back.

A frame is a ZMQ multipart message ``[MAGIC + version + kind, header, payload?]``. Single
messages have a JSON header (:func:`encode`); the messages every request sends (``Metadata``,
``Status``, ``AbortAck``) also travel as binary batches (:func:`encode_batch`): one frame carries
every such message a rank has for one peer in one step, in order, from one sender, so a step
costs one frame per peer rather than one per room, and no JSON. Anything that does not parse,
has the wrong version or kind, or fails validation raises :class:`MalformedFrame`; receivers
drop such frames (a whole batch at once) and count them.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
import numpy as np

from kvbridge.protocol.outcomes import FROM_OTHER_RANK
from kvbridge.types import DEVICE_PATTERN, MAX_DEVICE_CHARS, MemoryRegion, Role

MAGIC = b"KVB"
#: 2: reasons sanitised, control endpoints validated, optional authentication seal (auth.py).
#: 3: binary batches of Metadata, Status and AbortAck (kinds 8-10).
VERSION = 3
#: A batch holds at most this many messages (a rank sends one frame per peer per step).
MAX_BATCH = 1 << 16
_MAX_HEADER = 64 << 10
#: A batch body: a full batch of the largest messages fits (a frame is also capped by ZMQ).
_MAX_FRAME_BODY = 64 << 20
_MAX_TEXT = 1024
_MAX_KEY = 256
_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MalformedFrame(ValueError):
    pass


@attrs.frozen
class Register:
    """decode -> prefill, once per pair before any metadata: where the decode rank's memory is."""

    decode_key: str
    endpoint: dict[str, Any]
    kv_regions: tuple[tuple[int, int, int, str], ...]  # (addr, length, item_bytes, device)
    aux_regions: tuple[tuple[int, int, int, str], ...]
    control: str  # where this decode rank receives Status/AbortAck


@attrs.frozen(eq=False)
class Metadata:
    """decode -> prefill: write room's KV into these pages and its aux row into this slot.

    ``route`` is ``(src_offset, dst_offset, length)`` of the page slice this prefill rank
    writes, or None when it writes nothing for this room (it only takes part).
    """

    room: int
    decode_key: str
    pages: np.ndarray
    aux_slot: int
    expected: int
    route: tuple[int, int, int] | None


@attrs.frozen
class Abort:
    """decode -> prefill: give up on ``room``."""

    room: int
    sender_key: str
    reason: str
    #: False when the sender only followed another rank's failure (rule 7): its reason is
    #: then not a root cause and must not become anyone's.
    root: bool = True

    @classmethod
    def of(cls, room: int, sender_key: str, cause: str | None) -> Abort:
        """Decode rank ``sender_key`` gives up on ``room`` for its own ``cause``, or only
        because another rank failed (``cause`` None)."""
        if cause is None:
            return cls(room, sender_key, FROM_OTHER_RANK, root=False)
        return cls(room, sender_key, f"decode {sender_key}: {cause}")

    @property
    def cause(self) -> str | None:
        """The root cause, naming where it was seen; None from a rank that only followed."""
        return self.reason if self.root else None


@attrs.frozen
class Status:
    """prefill -> decode: this prefill rank's writes for ``room`` are done (or failed)."""

    room: int
    prefill_key: str
    ok: bool
    reason: str | None = None
    #: CRC-32 of what this rank wrote into the receiver (``verify_checksums`` only).
    checksum: int | None = None
    #: As :attr:`Abort.root`, for a failure.
    root: bool = True

    @classmethod
    def failed(cls, room: int, prefill_key: str, cause: str | None) -> Status:
        """Prefill rank ``prefill_key`` failed ``room`` for its own ``cause``, or only because
        another rank failed (``cause`` None)."""
        if cause is None:
            return cls(room, prefill_key, False, FROM_OTHER_RANK, root=False)
        return cls(room, prefill_key, False, f"prefill {prefill_key}: {cause}")

    @property
    def cause(self) -> str | None:
        """A failure's root cause (a sender that gave none: a generic one); None from a rank
        that only followed."""
        return (self.reason or "prefill reported failure") if self.root else None


@attrs.frozen
class AbortAck:
    """prefill -> decode: the abort of ``room`` was applied; no further writes will start."""

    room: int
    prefill_key: str


@attrs.frozen
class Heartbeat:
    """prefill -> decode, every ``heartbeat_interval`` while the pair shares live rooms."""

    prefill_key: str


@attrs.frozen(eq=False)
class Waiting:
    """decode -> prefill: these rooms are resolved here and wait only for decode memory.

    Renews the rooms' bootstrap deadline on the prefill (a lease): waiting for memory is not
    a failure, and decode sends it every ``heartbeat_interval`` while they wait.
    """

    decode_key: str
    rooms: np.ndarray


Message = Register | Metadata | Abort | Status | AbortAck | Heartbeat | Waiting
_KINDS: dict[int, type] = {
    1: Register,
    2: Metadata,
    3: Abort,
    4: Status,
    5: AbortAck,
    6: Heartbeat,
    7: Waiting,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
#: Batch frame kinds, by the message they carry.
_BATCH_KIND = {Metadata: 8, Status: 9, AbortAck: 10}
_BATCHED = {kind: cls for cls, kind in _BATCH_KIND.items()}


class Standing(enum.Enum):
    """Which ranks of the sending role a receiver accepts a message from (rule 9)."""

    #: Any: a key's first registration binds it to its memory; a heartbeat counts only from
    #: a writer this rank waits on.
    ANY = "any rank of that role"
    #: A decode rank that registered with this prefill rank.
    REGISTERED = "a registered decode rank"
    #: A decode rank registered for the room: the first complete set of metadata binds it.
    ROOM_DECODE = "a decode rank of the room"
    #: A prefill rank the room's plan names as writing into this decode rank.
    ROOM_WRITER = "a prefill rank that writes the room"


@attrs.frozen
class MaySend:
    """Who may send one kind of message: ``role``, with ``standing``, named by ``sender``
    (the field that carries the sender's key)."""

    role: Role
    standing: Standing
    sender: str


#: Rule 9, for every message: who sends it, and from which of them the receiver accepts it.
WHO_MAY_SEND: Mapping[type[Message], MaySend] = MappingProxyType(
    {
        Register: MaySend(Role.DECODE, Standing.ANY, "decode_key"),
        Metadata: MaySend(Role.DECODE, Standing.ROOM_DECODE, "decode_key"),
        Abort: MaySend(Role.DECODE, Standing.ROOM_DECODE, "sender_key"),
        Waiting: MaySend(Role.DECODE, Standing.REGISTERED, "decode_key"),
        Status: MaySend(Role.PREFILL, Standing.ROOM_WRITER, "prefill_key"),
        AbortAck: MaySend(Role.PREFILL, Standing.ROOM_WRITER, "prefill_key"),
        Heartbeat: MaySend(Role.PREFILL, Standing.ANY, "prefill_key"),
    }
)


def refused_by(role: Role, message: Message) -> bool:
    """Whether a rank of ``role`` drops ``message`` unread: only the other role sends it."""
    return WHO_MAY_SEND[type(message)].role is role


def sender_of(message: Message) -> str:
    """The key of the rank that says it sent ``message`` (untrusted until checked)."""
    return str(getattr(message, WHO_MAY_SEND[type(message)].sender))


def encode(message: Message) -> list[bytes]:
    kind = _KIND_OF[type(message)]
    head = MAGIC + bytes([VERSION, kind])
    if isinstance(message, Metadata):
        header = {
            "room": message.room,
            "decode_key": message.decode_key,
            "aux_slot": message.aux_slot,
            "expected": message.expected,
            "route": list(message.route) if message.route is not None else None,
        }
        pages = np.ascontiguousarray(message.pages, dtype="<i8").tobytes()
        return [head, json.dumps(header).encode(), pages]
    if isinstance(message, Waiting):
        rooms = np.ascontiguousarray(message.rooms, dtype="<u8").tobytes()
        return [head, json.dumps({"decode_key": message.decode_key}).encode(), rooms]
    return [head, json.dumps(attrs.asdict(message)).encode()]


def _int(header: dict[str, Any], key: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MalformedFrame(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str(header: dict[str, Any], key: str, optional: bool = False, limit: int = _MAX_KEY) -> str:
    value = header.get(key)
    if optional and value is None:
        return None  # type: ignore[return-value]
    if not isinstance(value, str) or len(value) > limit:
        raise MalformedFrame(f"{key} must be a string of at most {limit} characters")
    return value


def _bool(header: dict[str, Any], key: str, default: bool = True) -> bool:
    value = header.get(key, default)
    if not isinstance(value, bool):
        raise MalformedFrame(f"{key} must be a boolean")
    return value


def clean_text(text: str, limit: int = _MAX_TEXT) -> str:
    """A peer's free text made safe to log and show: no control characters, bounded length."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(header: dict[str, Any], key: str, optional: bool = False) -> str:
    value = _str(header, key, optional, limit=64 << 10)
    return value if value is None else clean_text(value)


def valid_endpoint(address: object) -> bool:
    """Whether ``address`` is a ``tcp://host:port`` a control socket may connect to."""
    if not isinstance(address, str):
        return False
    match = _ENDPOINT.fullmatch(address)
    return match is not None and 0 < int(match.group(2)) < 65536


def _control(header: dict[str, Any], key: str) -> str:
    value = header.get(key)
    if not valid_endpoint(value):
        raise MalformedFrame(f"{key} must be a tcp://host:port endpoint, got {value!r:.80}")
    return str(value)


#: A memory region on the wire: ``(addr, length, item_bytes, device)``.
WireRegion = tuple[int, int, int, str]


def regions_to_wire(regions: Sequence[MemoryRegion]) -> tuple[WireRegion, ...]:
    return tuple((r.addr, r.length, r.item_bytes, r.device) for r in regions)


def regions_from_wire(wire: Sequence[WireRegion]) -> tuple[MemoryRegion, ...]:
    return tuple(MemoryRegion(a, n, i, d) for a, n, i, d in wire)


def _regions(value: Any, key: str) -> tuple[tuple[int, int, int, str], ...]:
    """``[addr, length, item_bytes, device]`` entries; a 3-entry form (older peers) is ``cpu``."""
    if not isinstance(value, list) or len(value) > 100_000:
        raise MalformedFrame(f"{key} must be a list of [addr, length, item_bytes, device]")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) not in (3, 4)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item[:3])
        ):
            raise MalformedFrame(
                f"{key} entries must be three positive integers and a device, got {item!r:.200}"
            )
        device = item[3] if len(item) == 4 else "cpu"
        if (
            not isinstance(device, str)
            or len(device) > MAX_DEVICE_CHARS
            or not DEVICE_PATTERN.fullmatch(device)
        ):
            raise MalformedFrame(f"{key} device must be 'cpu' or 'cuda:N', got {device!r:.40}")
        out.append((item[0], item[1], item[2], device))
    return tuple(out)


def decode(frames: Sequence[bytes]) -> Message:
    """Parse a frame that carries one message (see :func:`decode_all`)."""
    messages = decode_all(frames)
    if len(messages) != 1:
        raise MalformedFrame(f"frame carries {len(messages)} messages, not one")
    return messages[0]


def _decode(frames: Sequence[bytes]) -> Message:
    if len(frames) not in (2, 3) or len(frames[0]) != 5 or frames[0][:3] != MAGIC:
        raise MalformedFrame("not a kvbridge control frame")
    version, kind = frames[0][3], frames[0][4]
    if version != VERSION:
        raise MalformedFrame(f"control frame version {version}, this kvbridge speaks {VERSION}")
    cls = _KINDS.get(kind)
    if cls is None:
        raise MalformedFrame(f"unknown control message kind {kind}")
    if len(frames[1]) > _MAX_HEADER:
        raise MalformedFrame(f"header larger than {_MAX_HEADER} bytes")
    try:
        header = json.loads(frames[1])
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedFrame("header must be a JSON object")
    if (len(frames) == 3) != (cls is Metadata or cls is Waiting):
        raise MalformedFrame("payload present on the wrong message kind")
    if cls is Metadata:
        payload = frames[2]
        if len(payload) % 8:
            raise MalformedFrame("page payload is not a whole number of int64")
        pages = np.frombuffer(payload, dtype="<i8").astype(np.int64)
        if pages.size and pages.min() < 0:
            raise MalformedFrame("negative page index")
        route = header.get("route")
        if route is not None and (
            not isinstance(route, list)
            or len(route) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in route)
        ):
            raise MalformedFrame(f"route must be null or three integers, got {route!r}")
        return Metadata(
            room=_int(header, "room", 1),
            decode_key=_str(header, "decode_key"),
            pages=pages,
            aux_slot=_int(header, "aux_slot", 0, 2**31),
            expected=_int(header, "expected", 1, 4096),
            route=tuple(route) if route is not None else None,
        )
    if cls is Register:
        endpoint = header.get("endpoint")
        if not isinstance(endpoint, dict):
            raise MalformedFrame("endpoint must be an object")
        return Register(
            decode_key=_str(header, "decode_key"),
            endpoint=endpoint,
            kv_regions=_regions(header.get("kv_regions"), "kv_regions"),
            aux_regions=_regions(header.get("aux_regions"), "aux_regions"),
            control=_control(header, "control"),
        )
    if cls is Abort:
        return Abort(
            room=_int(header, "room", 1),
            sender_key=_str(header, "sender_key"),
            reason=_reason(header, "reason"),
            root=_bool(header, "root"),
        )
    if cls is Status:
        ok = header.get("ok")
        if not isinstance(ok, bool):
            raise MalformedFrame("ok must be a boolean")
        return Status(
            room=_int(header, "room", 1),
            prefill_key=_str(header, "prefill_key"),
            ok=ok,
            reason=_reason(header, "reason", optional=True),
            checksum=None
            if header.get("checksum") is None
            else _int(header, "checksum", 0, 2**32 - 1),
            root=_bool(header, "root"),
        )
    if cls is Waiting:
        payload = frames[2]
        if len(payload) % 8 or len(payload) > 8 << 20:
            raise MalformedFrame("room payload is not a whole number of uint64 (at most 1 M)")
        rooms = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
        if rooms.size and rooms.min() == 0:
            raise MalformedFrame("room 0 is reserved")
        return Waiting(decode_key=_str(header, "decode_key"), rooms=rooms)
    if cls is Heartbeat:
        return Heartbeat(prefill_key=_str(header, "prefill_key"))
    return AbortAck(room=_int(header, "room", 1), prefill_key=_str(header, "prefill_key"))


# -- binary batches --------------------------------------------------------------------------
#
# [MAGIC + version + kind, body]; body = sender key length (u16), sender key (UTF-8), count (u32),
# count fixed-size records, then the variable part (Metadata: every page list, int64, in record
# order; Status: every reason, UTF-8, in record order). Little-endian throughout.

_COUNT = struct.Struct("<I")
_KEY_LEN = struct.Struct("<H")
#: room, aux_slot, expected, has route, route (src_offset, dst_offset, length), page count
_META = struct.Struct("<QIHBQQQI")
#: room, flags (ok, root, has checksum), checksum, reason length (_NO_REASON: none)
_STATUS = struct.Struct("<QBII")
_OK, _ROOT, _HAS_CHECKSUM = 1, 2, 4
_NO_REASON = 0xFFFFFFFF
_ACK = struct.Struct("<Q")


def batchable(message: Message) -> bool:
    """Whether ``message`` travels in a binary batch (:func:`encode_batch`)."""
    return type(message) in _BATCH_KIND


def encode_batch(messages: Sequence[Message]) -> list[bytes]:
    """One frame for ``messages``: all of one batchable kind and from one sender."""
    first = messages[0]
    cls = type(first)
    sender = sender_of(first)
    if not 0 < len(messages) <= MAX_BATCH or any(
        type(m) is not cls or sender_of(m) != sender for m in messages
    ):
        raise ValueError("a batch holds 1..MAX_BATCH messages of one kind from one sender")
    key = sender.encode()
    parts = [_KEY_LEN.pack(len(key)), key, _COUNT.pack(len(messages))]
    if cls is Metadata:
        pages = []
        for m in messages:
            assert isinstance(m, Metadata)
            route = m.route or (0, 0, 0)
            parts.append(
                _META.pack(
                    m.room, m.aux_slot, m.expected, m.route is not None, *route, len(m.pages)
                )
            )
            pages.append(np.ascontiguousarray(m.pages, dtype="<i8").tobytes())
        parts += pages
    elif cls is Status:
        reasons = []
        for m in messages:
            assert isinstance(m, Status)
            flags = (_OK if m.ok else 0) | (_ROOT if m.root else 0)
            flags |= _HAS_CHECKSUM if m.checksum is not None else 0
            # Bounded (the receiver keeps _MAX_TEXT characters anyway): one overlong reason
            # must not make the whole batch malformed.
            reason = b"" if m.reason is None else m.reason[: 4 * _MAX_TEXT].encode()
            parts.append(
                _STATUS.pack(
                    m.room, flags, m.checksum or 0, _NO_REASON if m.reason is None else len(reason)
                )
            )
            reasons.append(reason)
        parts += reasons
    else:
        parts += [_ACK.pack(m.room) for m in messages]  # type: ignore[union-attr]
    return [MAGIC + bytes([VERSION, _BATCH_KIND[cls]]), b"".join(parts)]


def decode_all(frames: Sequence[bytes]) -> list[Message]:
    """Every message of one multipart frame, single or batch, in order; raise
    :class:`MalformedFrame` (for the whole frame) on anything unexpected.

    Nothing else escapes: whatever a hostile frame makes the parser raise (deep JSON nesting
    raising RecursionError, odd types) becomes a MalformedFrame.
    """
    try:
        if len(frames) == 2 and len(frames[0]) == 5 and frames[0][4] in _BATCHED:
            if frames[0][:3] != MAGIC or frames[0][3] != VERSION:
                return [_decode(frames)]  # raises with the reason
            return _decode_batch(_BATCHED[frames[0][4]], frames[1])
        return [_decode(frames)]
    except MalformedFrame:
        raise
    except (
        RecursionError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        struct.error,
    ) as exc:
        raise MalformedFrame(f"unparseable frame ({type(exc).__name__})") from None


def _decode_batch(cls: type, body: bytes) -> list[Message]:
    if not _KEY_LEN.size <= len(body) <= _MAX_FRAME_BODY:
        raise MalformedFrame(f"batch body of {len(body)} bytes")
    (key_len,) = _KEY_LEN.unpack_from(body, 0)
    at = _KEY_LEN.size + key_len
    if key_len > 4 * _MAX_KEY or len(body) < at + _COUNT.size:
        raise MalformedFrame("batch sender key too long or truncated")
    try:
        key = body[_KEY_LEN.size : at].decode()
    except UnicodeDecodeError:
        raise MalformedFrame("batch sender key is not UTF-8") from None
    if len(key) > _MAX_KEY:
        raise MalformedFrame(f"sender key longer than {_MAX_KEY} characters")
    (count,) = _COUNT.unpack_from(body, at)
    at += _COUNT.size
    if not 0 < count <= MAX_BATCH:
        raise MalformedFrame(f"batch of {count} messages (1..{MAX_BATCH})")
    record = {Metadata: _META, Status: _STATUS, AbortAck: _ACK}[cls]
    end = at + count * record.size
    if len(body) < end:
        raise MalformedFrame("batch records truncated")
    records = list(record.iter_unpack(body[at:end]))
    rest = memoryview(body)[end:]
    if cls is Metadata:
        return _metadata_batch(key, records, rest)
    if cls is Status:
        return _status_batch(key, records, rest)
    if len(rest):
        raise MalformedFrame("bytes after the last AbortAck")
    out: list[Message] = []
    for (room,) in records:
        if room < 1:
            raise MalformedFrame("room must be an integer >= 1")
        out.append(AbortAck(room, key))
    return out


def _metadata_batch(key: str, records: list[tuple[int, ...]], rest: memoryview) -> list[Message]:
    total = sum(r[7] for r in records)
    if len(rest) != 8 * total:
        raise MalformedFrame("page payload does not match the page counts")
    pages = np.frombuffer(rest, dtype="<i8").astype(np.int64)
    if total and pages.min() < 0:
        raise MalformedFrame("negative page index")
    out: list[Message] = []
    at = 0
    for room, aux_slot, expected, has_route, src, dst, length, count in records:
        if room < 1 or aux_slot > 2**31 or not 1 <= expected <= 4096 or has_route > 1:
            raise MalformedFrame(f"metadata record out of range (room {room})")
        route = (src, dst, length) if has_route else None
        out.append(Metadata(room, key, pages[at : at + count], aux_slot, expected, route))
        at += count
    return out


def _status_batch(key: str, records: list[tuple[int, ...]], rest: memoryview) -> list[Message]:
    out: list[Message] = []
    at = 0
    for room, flags, checksum, reason_len in records:
        if room < 1 or flags > _OK | _ROOT | _HAS_CHECKSUM:
            raise MalformedFrame(f"status record out of range (room {room})")
        reason = None
        if reason_len != _NO_REASON:
            if reason_len > 64 << 10 or at + reason_len > len(rest):
                raise MalformedFrame("status reason too long or truncated")
            try:
                reason = clean_text(bytes(rest[at : at + reason_len]).decode())
            except UnicodeDecodeError:
                raise MalformedFrame("status reason is not UTF-8") from None
            at += reason_len
        out.append(
            Status(
                room,
                key,
                bool(flags & _OK),
                reason,
                checksum if flags & _HAS_CHECKSUM else None,
                bool(flags & _ROOT),
            )
        )
    if at != len(rest):
        raise MalformedFrame("bytes after the last status reason")
    return out
