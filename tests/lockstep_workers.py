"""Process bodies for the gloo lock-step tests (spawned; every one ends on its own).

Each decode worker is one decode TP rank in a real gloo group, plus an in-process prefill
rank that serves it over the Fake transport. Each prefill worker is one rank of a CP x TP
prefill group; authoritative ranks also host the decode rank they feed.
"""

from __future__ import annotations

import datetime
import logging
import time
import traceback
from typing import Any

import numpy as np
import torch.distributed as dist

from kvbridge import PagePool, RankIdentity, Role, TransferConfig, Transport
from kvbridge.errors import LockstepError
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.plan import DecodeMetadata, DecodePeer, PrefillTarget
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.collective import SingleRankReducer, TorchMinReducer
from kvbridge.runtime.decode_session import DecodeSession
from kvbridge.runtime.prefill_session import PrefillSession
from kvbridge.testing import RankBuffers

SHAPE = {"num_regions": 2, "num_pages": 64, "page_bytes": 1024, "num_slots": 8}


class DelayedDirectory:
    """Resolves each room ``delay`` steps after it was first asked about it."""

    def __init__(self, target: PrefillTarget, delay: int) -> None:
        self.target, self.delay, self.asked = target, delay, {}

    def resolve(self, requests):
        found = {}
        for r in requests:
            n = self.asked[r.room] = self.asked.get(r.room, -1) + 1
            if n >= self.delay:
                found[r.room] = self.target
        return found


def _init(rank: int, world: int, port: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


class DecodeRig:
    """A decode rank fed by one in-process prefill rank (its own group of one)."""

    def __init__(
        self, tp_rank: int, tp_size: int, config: TransferConfig, reducer: Any, dp_delay: int
    ) -> None:
        transport = Transport.from_config(config)
        self.dbuf, self.pbuf = RankBuffers.allocate(**SHAPE), RankBuffers.allocate(**SHAPE)
        self.dmgr = transport.create_manager(
            config,
            RankIdentity(Role.DECODE, tp_rank=tp_rank, tp_size=tp_size),
            self.dbuf.kv_regions,
            self.dbuf.aux_regions,
        )
        self.pmgr = transport.create_manager(
            config,
            RankIdentity(Role.PREFILL, tp_rank=tp_rank, tp_size=tp_size),
            self.pbuf.kv_regions,
            self.pbuf.aux_regions,
        )
        self.pages = PagePool(SHAPE["num_pages"])
        self.prefill_pages = PagePool(SHAPE["num_pages"])
        self.prefill_slots = PagePool(SHAPE["num_slots"])
        self.prefill = PrefillSession(
            config=config,
            manager=self.pmgr,
            kv_regions=self.pbuf.kv_regions,
            aux_regions=self.pbuf.aux_regions,
            reducer=SingleRankReducer(),
            notify_decode=lambda room, peers, ok, reason: self.decode.notify_done(
                room, "prefill", ok, reason
            ),
        )
        self.prefill.register_decode_peer(
            tp_rank, DecodePeer(self.dmgr.endpoint, self.dbuf.kv_regions, self.dbuf.aux_regions)
        )
        self.decode = DecodeSession(
            config=config,
            manager=self.dmgr,
            pages=self.pages,
            aux=self.dbuf.aux,
            reducer=reducer,
            directory=DelayedDirectory(PrefillTarget((self.pmgr.endpoint,)), dp_delay),
            send_metadata=lambda meta, target: self.prefill.on_metadata(
                DecodeMetadata(meta.room, tp_rank, meta.pages, meta.aux_slot)
            ),
        )
        self.tp_rank = tp_rank
        self.num_pages: dict[int, int] = {}
        self.in_flight: dict[int, tuple[np.ndarray, int]] = {}
        self.gate_held = 0

    def add(self, requests: list[DecodeRequest]) -> None:
        self.decode.add(requests)
        self.prefill.add([PrefillRequest(r.room) for r in requests])
        for r in requests:
            self.num_pages[r.room] = r.num_pages

    def prefill_step(self) -> None:
        self.handle_prefill(self.prefill.step())

    def handle_prefill(self, result: Any) -> None:
        """Run the 'forward pass' for ready rooms; free prefill memory of ended rooms."""
        for room in result.ready:
            pages = self.prefill_pages.alloc(self.num_pages[room])
            slot = int(self.prefill_slots.alloc(1)[0])
            self.pbuf.fill(room, pages)
            self.pbuf.write_aux(slot, room)
            self.in_flight[room] = (pages, slot)
            self.prefill.send(room, pages, is_last=True, aux_slot=slot)
        ended = list(result.finished) + [a.room for a in result.aborted]
        for room in ended:
            if room in self.in_flight:
                pages, slot = self.in_flight.pop(room)
                self.prefill_pages.free(pages)
                self.prefill_slots.free([slot])

    def count_gate(self) -> None:
        q = self.decode.queue
        for room, done in q.completions.items():
            i = q.cols.index_of(room)
            if i is not None and done and q.stamps[q.cols.slot[i]] == 0:
                self.gate_held += 1

    def close(self) -> None:
        self.dmgr.close()
        self.pmgr.close()


def decode_worker(rank: int, world: int, port: int, scenario: dict, results: Any) -> None:
    out: dict[str, Any] = {"rank": rank, "events": [], "errors": []}
    try:
        _init(rank, world, port)
        faults = scenario.get("faults", {})
        config = TransferConfig(
            transport="fake",
            transport_options={"faults": faults},
            waiting_timeout=scenario.get("waiting_timeout", 60.0),
            debug_lockstep=scenario.get("debug_lockstep", False),
        )
        reducer = TorchMinReducer(debug_lockstep=config.debug_lockstep)
        rig = DecodeRig(rank, world, config, reducer, scenario["dp_delay"][rank])
        adds = scenario["adds"]
        extra = scenario.get("extra_add", {}).get(str(rank))
        added = 0
        for step in range(scenario.get("max_steps", 3000)):
            if step < len(adds):
                batch = [DecodeRequest(room, n) for room, n in adds[step]]
                if extra is not None and step == extra[0]:
                    batch.append(DecodeRequest(*extra[1]))
                rig.add(batch)
                added += len(batch)
            rig.prefill_step()
            rig.count_gate()
            result = rig.decode.step()
            for c in result.committed:
                bad = rig.dbuf.mismatches(c.room, c.pages)
                out["events"].append(("commit", step, c.room))
                if bad:
                    out["errors"].append(f"room {c.room}: {bad[:3]}")
                if int(c.aux_row["output_token_id"]) != c.room % 50_000:
                    out["errors"].append(f"room {c.room}: wrong aux row")
                rig.pages.free(c.pages)
            for a in result.aborted:
                out["events"].append(("abort", step, a.room, a.reason, a.from_other_rank))
            if step >= len(adds) and len(rig.decode) == 0:
                break
            time.sleep(0.002)
        out["leftover"] = len(rig.decode)
        out["pages_free"] = rig.pages.num_free
        out["slots_free"] = rig.decode.aux_slots.num_free
        out["stamps_zero"] = not rig.dbuf.stamps.any()
        out["gate_held"] = rig.gate_held
        out["collectives"] = reducer.calls
        rig.close()
    except LockstepError as exc:
        out["lockstep_error"] = str(exc)
    except Exception:
        out["errors"].append(traceback.format_exc())
    finally:
        results.put(out)
        if dist.is_initialized():
            dist.destroy_process_group()


def cp_prefill_worker(rank: int, world: int, port: int, scenario: dict, results: Any) -> None:
    """CP=2 x TP=2 prefill (global rank = cp * 2 + tp); cp 0 is authoritative and hosts the
    decode rank of its TP shard (decode TP=2 in its own gloo subgroup)."""
    out: dict[str, Any] = {"rank": rank, "events": [], "errors": []}
    try:
        _init(rank, world, port)
        cp, tp = divmod(rank, 2)
        decode_group = dist.new_group([0, 1])
        config = TransferConfig(transport="fake")
        prefill_reducer = TorchMinReducer()
        adds = scenario["adds"]
        if cp == 0:
            rig = DecodeRig(tp, 2, config, TorchMinReducer(decode_group), 0)
            rig.prefill = PrefillSession(
                config=config,
                manager=rig.pmgr,
                kv_regions=rig.pbuf.kv_regions,
                aux_regions=rig.pbuf.aux_regions,
                reducer=prefill_reducer,
                notify_decode=lambda room, peers, ok, reason: rig.decode.notify_done(
                    room, "prefill", ok, reason
                ),
            )
            rig.prefill.register_decode_peer(
                tp, DecodePeer(rig.dmgr.endpoint, rig.dbuf.kv_regions, rig.dbuf.aux_regions)
            )
            prefill = rig.prefill
        else:
            rig = None
            label = RankIdentity(Role.PREFILL, cp_rank=cp, cp_size=2, tp_rank=tp, tp_size=2)
            prefill = PrefillSession(
                config=config, manager=None, reducer=prefill_reducer, origin=label.label
            )
        engine_aborts = scenario.get("engine_aborts", {}).get(str(rank), [])
        for step in range(scenario.get("max_steps", 3000)):
            if step < len(adds):
                if rig is not None:
                    rig.decode.add([DecodeRequest(room, n) for room, n in adds[step]])
                    rig.num_pages.update(dict(adds[step]))
                prefill.add([PrefillRequest(room) for room, _ in adds[step]])
            for at, room, reason in engine_aborts:
                if at == step:  # this rank's engine alone gives up on the room
                    prefill.abort(room, reason)
            result = prefill.step()
            for room in result.ready:
                out["events"].append(("ready", step, room))
                if rig is None:
                    prefill.send(room, np.zeros(0, dtype=np.int64), is_last=True)
            if rig is not None:
                rig.handle_prefill(result)
            for room in result.finished:
                out["events"].append(("finished", step, room))
            for a in result.aborted:
                out["events"].append(("abort", step, a.room, a.reason))
            if rig is not None:
                d = rig.decode.step()
                for c in d.committed:
                    out.setdefault("committed", []).append(c.room)
                    bad = rig.dbuf.mismatches(c.room, c.pages)
                    if bad:
                        out["errors"].append(f"room {c.room}: {bad[:3]}")
                    rig.pages.free(c.pages)
                for a in d.aborted:
                    if scenario.get("engine_aborts"):
                        out.setdefault("decode_aborted", []).append(
                            (a.room, a.reason, a.from_other_rank)
                        )
                    else:
                        out["errors"].append(f"decode aborted {a.room}: {a.reason}")
                    rig.pages.free(rig.decode.queue.allocated.get(a.room, np.zeros(0, int)))
            decode_busy = rig is not None and len(rig.decode) > 0
            flag = np.array([len(prefill) > 0 or decode_busy or step < len(adds)], dtype=np.uint8)
            import torch

            t = torch.from_numpy(flag)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # test harness: agree when to stop
            if not t.item():
                break
            time.sleep(0.002)
        if rig is not None:
            out["pages_free"] = rig.pages.num_free
            rig.close()
    except Exception:
        out["errors"].append(traceback.format_exc())
    finally:
        results.put(out)
        if dist.is_initialized():
            dist.destroy_process_group()
