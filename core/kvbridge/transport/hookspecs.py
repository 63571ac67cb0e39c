"""The contract between the kvbridge core and a transport plugin.

A transport moves bytes between registered memory regions and nothing else. The core owns the
protocol: bootstrap, control messages, rank mapping, timeouts, and the collective that keeps
ranks in lock-step. The core decides *what* to write where (it builds the descriptors); the
transport decides *how*.

How the core calls these hooks
------------------------------
Each installed transport gets its own :class:`pluggy.PluginManager`, so an operation hook call
reaches exactly the configured transport; the operation hooks are ``firstresult``. Observer
hooks (:class:`ObserverSpec`) are a separate, broadcast contract.

This contract is where rule 4 of kvbridge's README is decided for plugins. The core calls
every operation hook from the engine's scheduler thread: unless a hook says otherwise it
**must return quickly and must not block** on the network or on a peer (start the work on your
own thread or the library's asynchronous API and report progress through ``poll``), and it
**must never run a collective** (``torch.distributed`` or similar).

Errors
------
An exception raised by a per-room hook (construct, init, send_metadata, send, abort) is caught
by the core and turned into a local ``Failed`` for that room, with the exception as the reason.
An exception from ``poll`` fails every polled room. Raise with a message a user can act on.

Rooms
-----
A room is the 64-bit id of one request, shared by prefill and decode; 0 is reserved. Rooms are
unique within a manager while they live; after ``clear`` a room's number may come back.

Versioning
----------
:data:`KVBRIDGE_API_VERSION` is ``MAJOR.MINOR``. A plugin reports the version it was written
against in :meth:`TransportSpec.kvbridge_transport_info`; the core refuses another major
version, and a minor version newer than its own. A plugin for an older minor loads (the hooks
added since are optional for it, :data:`HOOKS_ADDED`); a plugin stating a minor must implement
every hook that minor added, or it is refused naming the hook: claiming 1.1 without
``kvbridge_sender_drained`` would silently give up the abort fence it claims.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from kvbridge.config import TransferConfig
    from kvbridge.status import KVPoll
    from kvbridge.types import (
        Endpoint,
        MemoryRegion,
        PollResult,
        RankIdentity,
        Role,
        SendChunk,
        TransportInfo,
    )

PROJECT_NAME = "kvbridge"
#: 1.1 added the abort fence: ``kvbridge_sender_drained`` and the ``sender_abort`` guarantee.
KVBRIDGE_API_VERSION = "1.1"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class TransportSpec:
    """Operation hooks. A transport must implement every one of them."""

    # -- identity ------------------------------------------------------------------------------

    @hookspec(firstresult=True)
    def kvbridge_transport_info(self) -> TransportInfo:
        """Describe the transport.

        :returns: a :class:`~kvbridge.types.TransportInfo` whose ``name`` equals the plugin's
            entry-point name, whose ``api_version`` is the :data:`KVBRIDGE_API_VERSION` the
            plugin was written against, and whose ``capabilities`` name optional behaviour
            (see :mod:`kvbridge.testing` for the flags the conformance kit understands).

        Called once when the plugin is loaded, and by ``kvbridge transports``. Must not import
        the native library or touch hardware: it has to work where the library is missing.
        """

    # -- manager: one per rank -----------------------------------------------------------------

    @hookspec(firstresult=True)
    def kvbridge_manager_create(
        self,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: tuple[MemoryRegion, ...],
        aux_regions: tuple[MemoryRegion, ...],
    ) -> Any:
        """Create the transport's per-rank state and register the rank's buffers.

        :param config: the engine's :class:`~kvbridge.config.TransferConfig`; read your own
            settings from ``config.transport_options``.
        :param rank: which rank this is (role, TP/CP/DP/PP ranks and sizes).
        :param kv_regions: KV buffers, one region per layer and K/V (``item_bytes`` = page).
        :param aux_regions: metadata buffers (``item_bytes`` = one row).
        :returns: an opaque manager object. The core passes it back as the first argument of
            every other hook and never looks inside.

        Called once per rank at engine start, before any request. May block (registration and
        listener start-up are slow on real hardware). Raise if the library is missing or
        registration fails; the message reaches the user as is.
        """

    @hookspec(firstresult=True)
    def kvbridge_manager_endpoint(self, manager: Any) -> Endpoint:
        """Return this rank's endpoint description.

        :returns: a JSON-safe mapping (address, session id, agent metadata, ...). The core
            publishes it through bootstrap registration and hands it unchanged to peers as an
            element of ``peers`` in ``*_init``.

        Called after ``kvbridge_manager_create``; may be called more than once.
        """

    @hookspec(firstresult=True)
    def kvbridge_manager_close(self, manager: Any) -> None:
        """Deregister memory and release every resource of the manager.

        Called once at shutdown, after every room was cleared. Must be safe to call when
        creation half-failed. May block briefly; must not raise for already-dead peers.
        """

    # -- decode side: receivers ----------------------------------------------------------------

    @hookspec(firstresult=True)
    def kvbridge_receiver_construct(self, manager: Any, room: int) -> None:
        """Create receive-side state for ``room``.

        Called on every decode rank in the same step when the engine adds the request. No I/O:
        the prefill rank that will serve the room may not be known yet. Status afterwards:
        ``Bootstrapping``.
        """

    @hookspec(firstresult=True)
    def kvbridge_receiver_init(self, manager: Any, room: int, peers: tuple[Endpoint, ...]) -> None:
        """Prepare to receive ``room`` from ``peers``.

        :param peers: endpoints of the prefill ranks that will write into this rank for this
            room, as published by their ``kvbridge_manager_endpoint``; the core has already done
            the rank mapping.

        Called once the prefill DP rank is resolved, possibly in different steps on different
        ranks. Connect to or register the peers here (start the connection; do not wait for
        it). Status afterwards: ``WaitingForInput``.
        """

    @hookspec(firstresult=True)
    def kvbridge_receiver_send_metadata(
        self, manager: Any, room: int, kv_indices: np.ndarray, aux_index: int
    ) -> None:
        """Pages and an aux slot were allocated for ``room``; expect writes into them.

        :param kv_indices: int64 page indices into every KV region.
        :param aux_index: the row of the aux regions the prefill will write last.

        The core itself sends the metadata to the prefill over its control channel; a
        transport only prepares what it needs to accept the writes (for example posting
        buffers or pre-building descriptor lists). Status afterwards: ``Transferring``.
        """

    @hookspec(firstresult=True)
    def kvbridge_receiver_poll(self, manager: Any, rooms: np.ndarray) -> PollResult:
        """Report the transport's own view of many rooms at once.

        :param rooms: uint64 array of every live room of this manager, in queue order.
        :returns: a :class:`~kvbridge.types.PollResult` with one status per room, in order.

        Called once per scheduler step for all receivers of the manager. Must not block. A
        receiver reports ``Failed`` (with a reason) when the transport knows the room cannot
        complete. Completion on decode is decided by the core from the prefill's completion
        messages and the aux room stamp, so a transport without native completion reports
        ``Transferring`` until then; ``Success`` from a receiver poll is advisory.
        """

    @hookspec(firstresult=True)
    def kvbridge_receiver_abort(self, manager: Any, room: int, reason: str) -> None:
        """Stop accepting writes for ``room`` and fail it locally.

        Called in any state, at most once per room, from the same step on every rank. Must
        not block; must not raise for a room that already finished.
        """

    @hookspec(firstresult=True)
    def kvbridge_receiver_clear(self, manager: Any, room: int) -> None:
        """Forget ``room`` and release every handle it holds.

        Called exactly once per room by the core, after success or abort; a second call or a
        call for an unknown room must be a no-op. Late reports for the room are ignored.
        """

    # -- prefill side: senders -----------------------------------------------------------------

    @hookspec(firstresult=True)
    def kvbridge_sender_construct(self, manager: Any, room: int) -> None:
        """Create send-side state for ``room``. No I/O. Status afterwards: ``Bootstrapping``."""

    @hookspec(firstresult=True)
    def kvbridge_sender_init(self, manager: Any, room: int, peers: tuple[Endpoint, ...]) -> None:
        """The decode ranks that receive ``room`` are known: ``peers`` are their endpoints.

        Called when every required decode rank has sent its metadata. Start connecting; do not
        wait. ``PeerWrite.peer`` in later ``send`` calls indexes this tuple.
        """

    @hookspec(firstresult=True)
    def kvbridge_sender_send(self, manager: Any, room: int, chunk: SendChunk) -> None:
        """Start writing one chunk of ``room``.

        :param chunk: descriptors per peer, contiguous runs already merged by the core;
            ``chunk.is_last`` marks the final chunk, which includes the aux row write (its room
            stamp last) and may contain no KV pages at all.

        Each run also names the device of its source and destination memory
        (``Descriptors.src_device`` / ``dst_device``: -1 host memory, N ``cuda:N``), so a
        transport describes each run as the memory it is (``Descriptors.device_groups``).

        Must return without waiting for the writes. Writes of one room to one peer must land
        in the order of ``send`` calls; within a chunk the order is free except that the aux
        row lands after the KV pages of the same chunk. The core relies on this order: on a
        decode rank written by one prefill rank, the landed room stamp alone completes the
        room. Report completion through ``poll``.
        """

    @hookspec(firstresult=True)
    def kvbridge_sender_poll(self, manager: Any, rooms: np.ndarray) -> PollResult:
        """Report many rooms at once: ``Success`` once every write of the last chunk landed.

        Called once per scheduler step for all senders of the manager. Must not block. A peer
        that vanished turns into ``Failed`` with a reason, never into a wait.
        """

    @hookspec(firstresult=True)
    def kvbridge_sender_abort(self, manager: Any, room: int, reason: str) -> None:
        """Stop writing ``room``: fail it, start no further write, cancel what the library can.

        Called once per room, from the same step on every rank, when the room ends without
        success (decode aborted it, a timeout, any rank failed). Must not block. From the
        moment it returns, no write of ``room`` may *start*; writes already handed to the
        library are cancelled where the library allows, otherwise left to finish, and then
        :meth:`kvbridge_sender_drained` reports the room drained. The core does not clear the
        room before it is drained.

        This is the sender's half of the abort fence (rule 8): decode reuses the room's pages
        and aux slot only after every writing prefill rank acknowledged the abort, and the core
        sends that acknowledgement only once this transport says the room is drained. A
        receiver cannot refuse a one-sided RDMA write, so this promise is all that protects
        memory the decode engine has already handed to another request.
        """

    @hookspec(firstresult=True)
    def kvbridge_sender_drained(self, manager: Any, rooms: np.ndarray) -> np.ndarray:
        """Which aborted rooms have no write in flight and none still to start (API 1.1).

        :param rooms: uint64 array of rooms passed to :meth:`kvbridge_sender_abort` and not yet
            cleared.
        :returns: a bool array, one entry per room, True once no byte of that room will land
            in any peer's memory any more (every write finished, failed or was cancelled).
            True must stay True.

        Called once per scheduler step while aborted rooms wait; must not block. A room that
        is unknown to the manager counts as drained. Once a room is reported drained the core
        acknowledges the abort to decode and then calls ``kvbridge_sender_clear``.
        A plugin written for API 1.0 has no such hook: the core then acknowledges at once and
        logs that the transport gives no drain guarantee.
        """

    @hookspec(firstresult=True)
    def kvbridge_sender_clear(self, manager: Any, room: int) -> None:
        """Forget ``room``; idempotent, like :meth:`kvbridge_receiver_clear`."""


#: Hooks added in a minor version, with that version. A plugin written for an older minor may
#: lack them (the core then falls back as each hook's documentation says); a plugin stating
#: that minor or a later one must implement them.
HOOKS_ADDED = {"kvbridge_sender_drained": "1.1"}
OPTIONAL_HOOKS = tuple(HOOKS_ADDED)
#: Every other operation hook; a transport missing one of them is refused at load time.
REQUIRED_HOOKS = tuple(
    name
    for name in vars(TransportSpec)
    if name.startswith("kvbridge_") and name not in OPTIONAL_HOOKS
)


class ObserverSpec:
    """Broadcast hooks for metrics, tracing and fault injection.

    Observers register through the entry-point group ``kvbridge.observers``. Every registered
    observer is called. Observers are called on the scheduler thread and must be cheap; an
    exception from an observer is logged and never changes a transfer's outcome.
    """

    @hookspec
    def kvbridge_request_finished(
        self,
        role: Role,
        rank: RankIdentity,
        room: int,
        status: KVPoll,
        reason: str | None,
        from_other_rank: bool,
    ) -> None:
        """A request left kvbridge's queues on this rank: committed (``Success``) or aborted."""

    @hookspec
    def kvbridge_root_cause(self, role: Role, rank: RankIdentity, room: int, reason: str) -> None:
        """The root cause of ``room`` reached this rank after the room had already left its
        queues as "failed on another rank" (``kvbridge_request_finished`` said so).

        :param reason: the cause with its origin (``prefill KEY: ...``, ``decode aborted:
            decode KEY: ...``). At most once per room and rank, on the scheduler thread.
        """

    @hookspec
    def kvbridge_step(
        self,
        role: Role,
        rank: RankIdentity,
        queued: int,
        reduced: int,
        stages: np.ndarray,
        fenced_bytes: int,
    ) -> None:
        """A scheduler step ran: ``queued`` live requests, ``reduced`` statuses all-reduced.

        :param stages: the queue's stage column (uint8, one entry per live request, in queue
            order): decode ``0`` waiting for resolution or memory, ``8`` transferring, ``16``
            aborted and fenced; prefill ``0`` waiting for decode metadata, ``1`` in flight.
            Read-only and only valid during the call: count it (``np.count_nonzero``), never
            keep or modify it.
        :param fenced_bytes: decode: KV bytes of this rank held by the abort fence (aborted
            rooms whose prefill writers have not confirmed they stopped); prefill: 0.

        Called by the sessions at the end of every step that reduced something (decode every
        rank; prefill the ranks that own a transport manager), on the scheduler thread. Runs
        once per step for the whole queue: keep it to a few microseconds.
        """

    @hookspec
    def kvbridge_transfer_finished(
        self, role: Role, rank: RankIdentity, room: int, nbytes: int, seconds: float
    ) -> None:
        """One request's KV and aux row moved completely on this rank.

        :param nbytes: decode: bytes received (pages x page bytes over every KV region, plus
            the aux row); prefill: bytes this rank wrote (the sum of its descriptors).
        :param seconds: decode: from sending the metadata (memory allocated) to the commit;
            prefill: from the first ``send`` of the room to the step that finished it.

        Called by ``DecodeSession`` for each commit and by an authoritative
        ``PrefillSession`` for each finished room, on the scheduler thread, in the step that
        reports them, before ``kvbridge_request_finished``. Must not block and must not keep
        references to the room's pages.
        """

    @hookspec
    def kvbridge_resolved(
        self, role: Role, rank: RankIdentity, room: int, seconds: float, ok: bool
    ) -> None:
        """Decode learned which prefill ranks serve ``room`` (bootstrap look-up, DP rank).

        :param seconds: from ``add`` to the resolution (or to the resolution failure).
        :param ok: False when resolution failed; the room is then failed locally.

        Called by ``DecodeSession`` on the scheduler thread, once per room, in the step that
        resolved it (possibly different steps on different ranks). Must not block.
        """

    @hookspec
    def kvbridge_control_dropped(
        self, role: Role, rank: RankIdentity, count: int, cause: str
    ) -> None:
        """Control frames were lost since the previous step: ``count`` of them.

        :param cause: ``"malformed"`` (an incoming frame that did not decode) or
            ``"send_failed"`` (an outgoing frame ZMQ refused to queue).

        Called by the nodes on the scheduler thread at the start of a step, only when the
        control channel's counters grew. Must not block.
        """
