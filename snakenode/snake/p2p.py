"""The snake in P2P mode: the holder of a job decides where it goes next. No coordinator anywhere.

One hop at holder H (DESIGN.md, "A hop"): apply the bundle -> train the window in the worker -> publish
progress -> rank candidates from their gossiped profiles -> negotiate (Propose -> Accept | Decline) ->
transfer the layers the successor lacks -> keep the baton (H's model and state) while the successor renews
its lease -> drop it once the successor reports that it handed the next hop on. A lapsed lease or a
disconnect makes H retry the hop as the next attempt with another candidate; `(hop, attempt)` and the
lineage hash chain fence off the loser (the zombie successor, or a rival lineage after a partition), which
stops and logs `superseded`.

Decisions (routing, windows, laps, fencing) are the pure functions of routing.py, window.py and state.py;
this module is their I/O: streams, the worker, checkpoints, the hop log.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from snakenode import logs, wire
from snakenode.control import ControlError
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.net import transfer
from snakenode.snake import custody as custody_mod
from snakenode.snake import hoplog, routing
from snakenode.snake import state as st
from snakenode.snake.coordinator import CS
from snakenode.snake.job import JobRejected, SignedJob, dataset_matches, metric_name, verify_job
from snakenode.snake.messages import (
    MAX_TAIL,
    Accept,
    ClaimRef,
    Decline,
    Propose,
    decode_layer_list,
    decode_links,
    decode_model_state,
)
from snakenode.snake.runtime import Baton, JobRun
from snakenode.snake.state import Claim, JobState, compare_claims
from snakenode.snake.window import size_window

if TYPE_CHECKING:
    from snakenode.daemon import Daemon

log = logs.get("snake")

LEASE_RENEW_S = 1.0  # the successor renews its baton lease this often...
LEASE_TIMEOUT_S = 6.0  # ...and the predecessor retries the hop when it has not heard for this long
DISCONNECT_GRACE_S = 1.0  # a successor gone from the peer table this long counts as lost
PROPOSE_TIMEOUT_S = 10.0
RESERVATION_S = 30.0  # an Accept holds the node for this long while the bundle arrives
JOIN_WAIT_S = 3.0  # the submitting node gives peers this long to hear of the job and say they join...
PREPARE_WAIT_S = 120.0  # ...and waits at most this long for those still building the model (torch start-up)
WAIT_TICK_S = 0.5  # when no candidate is eligible, look again this often
RESUME_LISTEN_S = 4.0  # a restarted holder whose predecessor is unreachable listens this long for later claims
STATE_TIMEOUT_S = 5.0
COMPLETE_REPEATS_S = (0.0, 2.0, 6.0, 15.0)  # completion is re-announced: gossip is best effort
HOLDING = ("received", "training", "trained", "handing_off")
# Hop-log events every node needs (fencing, supersession, completion, the per-hop metric). The rest stay in
# the writer's own log; `job` with collect=true pulls them from the peers for watch, jobs and the demo.
GOSSIPED_EVENTS = ("received", "trained", "retry", "reassigned", "superseded", "resumed", "job_complete",
                   "lap_complete")


def _own_records(run: JobRun) -> list[dict[str, Any]]:
    return hoplog.read_log(run.hoplog_path) if run.hoplog_path.exists() else []


class Reservation:
    def __init__(self, run: JobRun, state: JobState, proposer: str) -> None:
        self.run = run
        self.state = state
        self.proposer = proposer
        self.expires = time.monotonic() + RESERVATION_S
        self.lane_id: str | None = None  # the lane offer made in the Accept, if any

    @property
    def claim(self) -> Claim:
        return self.state.claim


class Superseded(Exception):
    pass


class Snake:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.svc = daemon.service
        self.cfg = daemon.cfg
        self.me = daemon.service.peer_id
        self.counters = daemon.service.counters
        self.faults = daemon.faults
        self.store = LayerStore(self.cfg.home / "store")
        self.jobs_dir = self.cfg.home / "jobs"
        self.jobs: dict[str, JobRun] = {}
        self.reservation: Reservation | None = None
        self.active: str | None = None  # the job whose hop this node holds (one at a time)
        self.down_since: dict[str, float] = {}
        self.nursery: trio.Nursery | None = None
        self.extra_trusted: set[str] = set()
        self._rejected_jobs: set[str] = set()
        self._custody_pending: set[tuple[str, str]] = set()  # (job, lineage) chains being fetched
        self._asking: set[str] = set()
        self.cs = CS(self)

    # ================================================================================ setup
    def trusted(self) -> set[str]:
        return {self.me, *self.cfg.trusted_submitters, *self.extra_trusted}

    def load(self) -> None:
        if not self.jobs_dir.exists():
            return
        for d in sorted(self.jobs_dir.iterdir()):
            if (d / "job.msgpack").exists():
                try:
                    run = JobRun.load(d)
                except (JobRejected, OSError) as exc:
                    log.warning("job_unreadable", dir=str(d), error=str(exc))
                    continue
                self.jobs[run.job_id] = run

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.svc.register_protocol(wire.PROTO_NEGOTIATE, "negotiate", self._serve_negotiate)
        self.svc.register_protocol(wire.PROTO_BUNDLE, "bundle", self._serve_bundle)
        self.svc.register_protocol(wire.PROTO_STATE, "state", self._serve_state)
        self.svc.register_protocol(wire.PROTO_CS, "cs", self.cs.serve)
        assert self.svc.gossip is not None
        self.svc.gossip.on("jobs", self._on_jobs_msg)
        self.svc.gossip.on("progress", self._on_progress_msg)
        self.svc.peer_events.append(self._on_peer_event)
        self.svc.profile_events.append(self._on_peer_profile)
        self.load()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for run in self.jobs.values():
                if run.joined or run.origin:
                    nursery.start_soon(self._prepare, run)
                nursery.start_soon(self._recover, run)
            nursery.start_soon(self._reaper)
            self._update_profile()
            task_status.started()
            await trio.sleep_forever()

    def _on_peer_profile(self, prof: dict[str, Any]) -> None:
        """A peer works on jobs we never heard of (we joined late): ask it for them at once."""
        for job_id in [*(prof.get("jobs") or []), *(prof.get("preparing") or [])]:
            if job_id not in self.jobs and job_id not in self._rejected_jobs and job_id not in self._asking \
                    and self.nursery is not None:
                self._asking.add(job_id)
                self.nursery.start_soon(self._ask_job, prof["peer_id"], job_id)

    async def _ask_job(self, peer: str, job_id: str) -> None:
        try:
            kind, f = await self._state_request(peer, {"t": "get_job", "job_id": job_id})
            if kind != "job":
                return
            signed = SignedJob.decode(f.bytes("job", 64 * 1024))
            if signed.job_id != job_id:
                raise wire.WireError("the peer sent another job than asked", "forged")
            verify_job(signed, self.trusted())
            self.intake(signed)
        except JobRejected as exc:
            self._rejected_jobs.add(job_id)
            self.counters.add(f"reject.job.{exc.reason}")
            log.warning("job_rejected", job=job_id, reason=exc.reason, detail=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - the periodic re-announcement is the fallback
            self.counters.add("snake.get_job.failed")
            log.debug("get_job_failed", job=job_id, peer=peer, error=f"{type(exc).__name__}: {exc}"[:200])
        finally:
            self._asking.discard(job_id)

    def _on_peer_event(self, event: str, pid: str) -> None:
        if event == "down":
            self.down_since.setdefault(pid, time.monotonic())
        else:
            self.down_since.pop(pid, None)

    async def _reaper(self) -> None:
        while True:
            await trio.sleep(1.0)
            r = self.reservation
            if r is not None and time.monotonic() > r.expires and r.run.phase == "reserved":
                log.info("reservation_expired", job=r.run.job_id, hop=r.state.hop, proposer=r.proposer)
                self.counters.add("snake.reservation_expired")
                self._cancel_lane(r)
                self.reservation = None
                r.run.phase = "idle"
                self._set_idle()

    def _cancel_lane(self, r: Reservation | None) -> None:
        """Forget a reservation's lane offer (replaced, expired, or the bundle came over libp2p)."""
        if r is not None and r.lane_id is not None and self.d.lane is not None:
            self.d.lane.cancel(r.lane_id)
            r.lane_id = None

    def _lane_threshold(self) -> int:
        return int(self.cfg.lane_min_mb * 2**20)

    def _set_idle(self) -> None:
        if self.active is None and self.reservation is None:
            self.svc.set_state("idle")

    def _update_profile(self) -> None:
        ids = sorted(j.job_id for j in self.jobs.values()
                     if j.joined and j.ready.is_set() and j.completed is None)
        preparing = sorted(j.job_id for j in self.jobs.values()
                           if j.joined and not j.ready.is_set() and not j.error and j.completed is None)
        if self.svc.profile_fields.get("jobs") != ids or self.svc.profile_fields.get("preparing") != preparing:
            self.svc.profile_fields["jobs"] = ids
            self.svc.profile_fields["preparing"] = preparing
            self.svc.profile_changed()

    # ================================================================================ jobs
    def _record(self, run: JobRun, event: str, state: JobState, **fields: Any) -> dict[str, Any]:
        rec = hoplog.from_state(event, state, node=self.me, t=time.time(), **fields)
        run.log(rec)
        if event in GOSSIPED_EVENTS and self.nursery is not None:
            msg: dict[str, Any] = {"t": "progress", "rec": rec}
            link = run.custody.links.get(state.lineage)
            if link is not None:
                msg["cust"] = [link.signer, link.sig]  # the rest of the link is in the record
            self.nursery.start_soon(self._publish_progress, msg)
        return rec

    async def _publish_progress(self, msg: dict[str, Any]) -> None:
        if self.svc.gossip is not None:
            await self.svc.gossip.publish("progress", wire.packb(msg))

    # ================================================================================ chain of custody
    def _certify(self, run: JobRun, state: JobState) -> None:
        """Sign the hand-over of `state` (this node holds its parent, submitted the job, or coordinates it)."""
        if state.lineage in run.custody.links:
            return
        link = custody_mod.sign(self.d.ident, state.parent_lineage, state.hop, state.attempt, state.holder)
        problem, missing = run.add_custody([link])
        if problem or missing:
            self.counters.add("error.custody.sign")
            log.error("custody_sign_failed", job=run.job_id, hop=state.hop, problem=problem,
                      missing=(missing or "")[:16], hint="this node cannot prove it held the hop before: "
                      "its successor will decline the proposal with `custody`")

    async def _fetch_custody(self, run: JobRun, peer: str, lineage: str) -> list[custody_mod.Link]:
        self.counters.add("custody.fetch")
        kind, f = await self._state_request(peer, {"t": "get_custody", "job_id": run.job_id, "lineage": lineage})
        if kind != "custody":
            raise wire.WireError(f"{peer} has no chain of custody for lineage {lineage[:16]}", "custody")
        return decode_links(f, "links", custody_mod.MAX_CHAIN)

    async def _accept_custody(self, run: JobRun, peer: str, links: list[custody_mod.Link], lineage: str,
                              fetch: bool = True) -> str | None:
        """None when `lineage` is proven after adding `links` (fetching the missing part of the chain from
        `peer`, the one presenting it, when `fetch`), else why not."""
        problem, _ = run.add_custody(links)
        if problem is None and not run.custody.known(lineage) and fetch:
            try:
                fetched = await self._fetch_custody(run, peer, lineage)
            except Exception as exc:  # noqa: BLE001 - any failure: the claim stays unproven
                self.counters.add("custody.fetch_failed")
                return (f"the chain of custody of hop lineage {lineage[:16]} has a gap and {peer} did not fill it "
                        f"({type(exc).__name__}: {str(exc)[:120]})")
            # A whole chain: verify it off the event loop (~0.2 ms a link; liveness must keep answering).
            problem, _ = await trio.to_thread.run_sync(run.add_custody, fetched + links)
        if problem is not None:
            return problem
        if not run.custody.known(lineage):
            return f"no chain of custody reaches lineage {lineage[:16]} from the job's genesis"
        return None

    def intake(self, signed: SignedJob, origin: bool = False) -> JobRun:
        """Record a verified job; join it when this node's data matches."""
        run = self.jobs.get(signed.job_id)
        if run is not None:
            return run
        run = JobRun.create(self.jobs_dir, signed)
        run.origin = origin
        spec = signed.spec
        if self.cfg.role != "node":
            run.joined, run.join_reason = False, f"role {self.cfg.role} does not train"
        elif self.d.data_spec is None:
            run.joined, run.join_reason = False, "no local data (start with --data)"
        elif not dataset_matches(spec["dataset"], self.cfg.data):
            run.joined, run.join_reason = False, f"local data {self.cfg.data!r} does not match {spec['dataset']!r}"
        else:
            run.joined, run.join_reason = True, "data matches"
        run.save_meta()
        self.jobs[run.job_id] = run
        self._update_profile()
        log.info("job_known", job=run.job_id, name=spec.get("name"), joined=run.joined, reason=run.join_reason,
                 submitter=signed.submitter)
        if (run.joined or origin) and self.nursery is not None:
            self.nursery.start_soon(self._prepare, run)
        return run

    async def _prepare(self, run: JobRun) -> None:
        """Build the job's initial model in the worker (schema + deterministic initial layers)."""
        if run.ready.is_set():
            return
        try:
            if not run.schema or not all(self.store.has(h) for h in run.init_state.values()):
                res = await self.d.worker_call("model_init", {"job": run.spec})
                run.schema = bundle_mod.schema_map(res["layers"])
                run.blocks = int(res["blocks"])
                run.init_state = dict(res["state"])
            if run.joined and run.capacity is None:
                run.capacity = await self.d.worker_call("capacity", {"job": run.spec,
                                                                     "data": self.d.data_spec.to_dict()})
            run.save_meta()
            run.ready.set()
            log.info("job_ready", job=run.job_id, blocks=run.blocks, layers=len(run.schema), joined=run.joined)
            self._update_profile()
        except Exception as exc:  # noqa: BLE001 - a job this node cannot build must not take it down
            run.error = f"{type(exc).__name__}: {exc}"
            self.counters.add("error.job_prepare")
            log.error("job_prepare_failed", job=run.job_id, error=run.error[:300])
            self._update_profile()

    async def submit(self, raw: bytes) -> dict[str, Any]:
        try:
            signed = SignedJob.decode(raw)
            verify_job(signed, self.trusted())
        except JobRejected as exc:
            self.counters.add(f"reject.job.{exc.reason}")
            raise ControlError(str(exc), exc.reason) from None
        if signed.job_id in self.jobs:
            raise ControlError(f"job {signed.job_id} is already known here", "duplicate")
        if signed.spec["mode"] == "cs" and signed.spec.get("coordinator") != self.me:
            raise ControlError(f"a CS job is submitted on its coordinator ({signed.spec.get('coordinator')}), "
                               f"not here: run `snakenode submit ... --mode cs --home COORDINATOR_HOME`",
                               "not_coordinator")
        run = self.intake(signed, origin=True)
        assert self.svc.gossip is not None
        await self.svc.gossip.publish("jobs", wire.packb({"t": "job", "job": raw}))
        assert self.nursery is not None
        self.nursery.start_soon(self._originate, run)
        self.nursery.start_soon(self._reannounce, run, raw)
        return {"job_id": signed.job_id, "joined": run.joined, "name": signed.spec.get("name")}

    async def _reannounce(self, run: JobRun, raw: bytes) -> None:
        """Late joiners learn of the job: re-announce while it runs (gossip is best effort)."""
        delays = [1.0, 2.0]  # late joiners also learn of the job from the peers' profiles (get_job)
        while run.completed is None:
            await trio.sleep(delays.pop(0) if delays else 60.0)
            if run.completed is None and self.svc.gossip is not None:
                await self.svc.gossip.publish("jobs", wire.packb({"t": "job", "job": raw}))

    async def _on_jobs_msg(self, sender: str, obj: dict[str, Any]) -> None:
        f = wire.Fields(obj, "jobs")
        kind = f.str("t", 16)
        if kind == "job":
            raw = f.bytes("job", 64 * 1024)
            try:
                signed = SignedJob.decode(raw)
            except JobRejected as exc:
                raise wire.WireError(str(exc), "bad_job") from None
            if signed.job_id in self.jobs:
                return
            try:
                verify_job(signed, self.trusted())
            except JobRejected as exc:
                if signed.job_id not in self._rejected_jobs:
                    self._rejected_jobs.add(signed.job_id)
                    self.counters.add(f"reject.job.{exc.reason}")
                    log.warning("job_rejected", job=signed.job_id, reason=exc.reason, detail=str(exc)[:200])
                return
            self.intake(signed)
        elif kind == "complete":
            await self._on_complete(sender, obj)
        else:
            raise wire.WireError(f"unknown jobs message {kind!r}", "unexpected")

    # ================================================================================ views of the network
    def members(self, run: JobRun) -> set[str]:
        """Joined, alive nodes (this one included when it joined): the next lap's members."""
        out = {e.peer_id for e in self.svc.table.live()
               if e.profile and run.job_id in (e.profile.get("jobs") or [])}
        if run.joined and run.ready.is_set():
            out.add(self.me)
        return out

    def _candidates(self) -> list[routing.Candidate]:
        """Every known peer for routing. Profile states are advisory (they are refreshed lazily to keep
        gossip small), so candidates count as idle here; a busy one answers Decline(busy)."""
        now = time.monotonic()
        idle = {"kind": "idle", "job": None, "hop": None}
        out = [routing.Candidate(self.me, {**self.svc.profile(), "state": idle}, True, 0.0, 0.0)]
        for e in self.svc.table.entries.values():
            if e.profile is None or e.peer_id == self.me:
                continue
            out.append(routing.Candidate(e.peer_id, {**e.profile, "state": idle}, e.live,
                                         max(0.0, now - e.last_seen), e.rtt_ms))
        return out

    def _down_for(self, state: JobState) -> dict[str, float]:
        now = time.monotonic()
        live = self.svc.table.live_ids() | {self.me}
        out = {}
        for pid in state.lap_members:
            if pid not in live:
                out[pid] = now - self.down_since.setdefault(pid, now)
        return out

    def _min_memory(self, run: JobRun) -> float:
        cap = run.capacity
        if not cap:
            return 0.0
        try:
            return float(cap["fixed_mb"]) + min(float(b["train_mb"]) for b in cap["blocks"])
        except (KeyError, ValueError, TypeError):
            return 0.0

    def _reference_hist(self, run: JobRun) -> list[float] | None:
        if run.spec["kd"]["reference"] != "union":
            return None
        total: list[float] = []
        profiles = [self.svc.profile()] + [e.profile for e in self.svc.table.live() if e.profile]
        for p in profiles:
            if run.job_id not in (p.get("jobs") or []) and p is not self.svc.profile():
                continue
            hist = ((p.get("data") or {}).get("label_hist")) or []
            total = [a + b for a, b in zip(total + [0] * (len(hist) - len(total)),
                                           hist + [0] * (len(total) - len(hist)), strict=True)]
        return total or None

    # ================================================================================ origin
    async def _originate(self, run: JobRun) -> None:
        """The submitting node starts the job: hop 0 here when it joined, else proposed to a member."""
        with trio.move_on_after(600):
            await run.ready.wait()
        if not run.ready.is_set():
            log.error("job_not_started", job=run.job_id, error=run.error or "model init did not finish")
            return
        # Give every peer time to hear of the job, then wait for those still building its model.
        await trio.sleep(JOIN_WAIT_S)
        deadline = time.monotonic() + PREPARE_WAIT_S
        while time.monotonic() < deadline:
            preparing = [e.peer_id for e in self.svc.table.live()
                         if e.profile and run.job_id in (e.profile.get("preparing") or [])]
            if not preparing:
                break
            await trio.sleep(0.2)
        while not self.members(run):
            log.info("waiting_for_members", job=run.job_id)
            self.svc.set_state("waiting", run.job_id)
            await trio.sleep(1.0)
        members = self.members(run)
        async with run.lock:
            if run.state is not None or run.completed is not None:
                return
            if run.joined:
                size = self._my_window_size(run, None)
                if size is None:
                    size = int(run.spec["window"]["min_blocks"])
                state = st.start_job(run.job_id, members, self.me, min(size, run.blocks), run.blocks)
                self._certify(run, state)
                run.state, run.model, run.phase = state, dict(run.init_state), "received"
                run.observe(state.claim)
                run.save_checkpoint()
                self._record(run, "received", state, t_recv=time.time())
                self.active = run.job_id
                assert self.nursery is not None
                self.nursery.start_soon(self._hold, run)
                return
        await self._handoff(run, None, dict(run.init_state))

    # ================================================================================ holding a hop
    def _my_window_size(self, run: JobRun, prev: Any) -> int | None:
        w = run.spec["window"]
        lo, hi = int(w["min_blocks"]), int(w["max_blocks"])
        cap = run.capacity
        if not cap:
            return min(hi, run.blocks)
        sizing = size_window(cap, prev, run.blocks, float(self.cfg.memory_mb), float(w["hop_time_s"]), lo, hi,
                             train_stem=bool(w["train_stem"]), train_head=bool(w["train_head"]),
                             epochs=int(run.spec["train"]["epochs"]),
                             max_steps=int(run.spec["train"]["max_steps"]))
        return sizing.size if sizing.size else None

    async def _hold(self, run: JobRun) -> None:
        """Train this node's hop, then hand the snake on. Cancelled when the hop is superseded."""
        state = run.state
        assert state is not None
        self.active = run.job_id
        scope = trio.CancelScope()
        run.scope = scope
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._lease_loop, run, state)
                    await self._train_and_handoff(run, state)
                    nursery.cancel_scope.cancel()
        except Superseded as exc:
            log.info("hop_abandoned", job=run.job_id, hop=state.hop, why=str(exc))
        except Exception as exc:  # noqa: BLE001 - keep the node up; the predecessor's lease will lapse
            self.counters.add("error.hop")
            log.error("hop_failed", job=run.job_id, hop=state.hop, error=f"{type(exc).__name__}: {exc}"[:400])
            run.error = f"hop {state.hop}: {type(exc).__name__}: {exc}"
            if run.phase in HOLDING:
                run.phase = "idle"
        finally:
            if self.active == run.job_id and (run.state is None or run.state.hop == state.hop
                                              or run.phase not in HOLDING):
                self.active = None
            self._set_idle()
        if scope.cancelled_caught:
            log.info("hop_cancelled", job=run.job_id, hop=state.hop)

    async def _train_and_handoff(self, run: JobRun, state: JobState) -> None:
        spec = run.spec
        w = spec["window"]
        trained = {"stem": bool(w["train_stem"]), "head": bool(w["train_head"])}
        self.faults.check("train", hop=state.hop, attempt=state.attempt, job=run.job_id)
        run.phase = "training"
        self.svc.set_state("training", run.job_id, state.hop)
        t_start = time.time()
        self._record(run, "train_start", state, trained=trained, t_train_start=t_start)
        gossip_before = self.counters.total("bytes.gossip.")

        def on_event(name: str, data: dict[str, Any]) -> None:
            run.last_metrics = {"event": name, **data}

        try:
            result = await self.d.worker_call("train_hop", {
                "job": spec, "state": run.model, "window": [state.window.start, state.window.end],
                "train_stem": trained["stem"], "train_head": trained["head"], "data": self.d.data_spec.to_dict(),
                "reference_hist": self._reference_hist(run), "max_time_s": float(w["hop_time_s"]) * 3,
                "slowdown": self.cfg.compute_slowdown,
            }, on_event=on_event)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                if self.d.worker is not None:
                    await self.d.worker.cancel()
            raise
        t_end = time.time()  # the worker stretches every step by `slowdown` (an emulated slower device)
        new_model = dict(result["state"])
        missing = [h for h in new_model.values() if not self.store.has(h)]
        if missing or set(new_model) != set(run.schema):
            raise RuntimeError(f"the worker returned an incomplete model ({len(missing)} layers missing)")
        metric = metric_name(spec)
        after = {k: float(v) for k, v in (result.get("metrics_after") or {}).items() if isinstance(v, int | float)}
        before = {k: float(v) for k, v in (result.get("metrics_before") or {}).items() if isinstance(v, int | float)}
        members = self.members(run)
        async with run.lock:
            self._check_current(run, state)
            base = st.finish_hop(state, metric=after.get(metric), members=members)
            run.state, run.model, run.phase = base, new_model, "trained"
            run.save_checkpoint()
        self._record(run, "trained", state, trained=trained, metrics_before=before, metrics_after=after,
                     t_train_start=t_start, t_train_end=t_end,
                     bytes={"gossip": self.counters.total("bytes.gossip.") - gossip_before},
                     detail={"kd": result.get("kd"), "samples_per_s": result.get("samples_per_s"),
                             "peak_rss_mb": result.get("peak_rss_mb")})
        log.info("hop_trained", job=run.job_id, hop=state.hop, lap=state.lap, window=str(state.window),
                 metric=after.get(metric), seconds=round(t_end - t_start, 2))
        if base.lap > state.lap:
            self._record(run, "lap_complete", base, detail={"metric": base.lap_metrics[-1]})
        done = st.job_done(base, spec)
        if self.faults.check("handoff", hop=state.hop, attempt=state.attempt, job=run.job_id) == "poison":
            new_model = await trio.to_thread.run_sync(self._poisoned, new_model)
            run.model = new_model
        if self.cs.is_cs(run):
            # CS mode: the trained window goes back to the coordinator, which plans the next hop.
            test = await self._final_test(run, new_model) if done else None
            run.phase = "handing_off"
            self.svc.set_state("sending", run.job_id, state.hop)
            if await self.cs.hand_back(run, base, new_model, test):
                async with run.lock:
                    if run.phase in HOLDING or run.phase == "waiting":
                        run.phase = "idle"
                    run.save_checkpoint()
                return
            # fallback = "p2p": the coordinator is gone; carry on as a P2P holder.
        if done:
            await self._complete(run, base)
            return
        run.phase = "handing_off"
        self.svc.set_state("sending", run.job_id, state.hop)
        await self._handoff(run, base, new_model)

    def _poisoned(self, model: dict[str, str]) -> dict[str, str]:
        """TEST ONLY (--test-faults poison@handoff): the model with every float weight scaled by 1000."""
        out = {}
        for name, h in model.items():
            tensors = bundle_mod.decode_blob(self.store.get_bytes(h), name)
            scaled = {k: (v * 1000).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
            out[name] = self.store.put_bytes(bundle_mod.encode_blob(scaled))
        return out

    def _check_current(self, run: JobRun, state: JobState) -> None:
        if run.state is None or run.state.lineage != state.lineage or run.phase in ("superseded", "done"):
            raise Superseded(f"hop {state.hop} attempt {state.attempt} was superseded")

    async def _lease_loop(self, run: JobRun, state: JobState) -> None:
        """Renew the baton lease with our predecessor (the coordinator in CS mode) while we hold this hop."""
        pred = self.cs.lease_target(run, state)
        if pred is None or pred == self.me:
            return
        ref = ClaimRef.of(state)
        while run.state is not None and run.state.hop == state.hop and run.phase in (*HOLDING, "waiting"):
            try:
                kind, f = await self._state_request(pred, ref.to_wire("lease", phase=run.phase))
                if kind == "lease_revoked":
                    await self._supersede(run, state, f.str("by", 64, required=False) or "predecessor",
                                          f"predecessor revoked our lease: {f.str('reason', 200, required=False)}")
                    return
            except Exception:  # noqa: BLE001 - the predecessor may be gone; we carry on regardless
                self.counters.add("snake.lease.unreachable")
            await trio.sleep(LEASE_RENEW_S)

    async def _supersede(self, run: JobRun, state: JobState, by: str, why: str) -> None:
        async with run.lock:
            if run.state is None or run.state.lineage != state.lineage or run.phase not in HOLDING:
                return
            run.phase = "superseded"
            run.save_checkpoint()
        self.counters.add("snake.superseded")
        log.warning("superseded", job=run.job_id, hop=state.hop, attempt=state.attempt, by=by[:16], why=why)
        self._record(run, "superseded", state, detail={"by": by, "why": why})
        if run.scope is not None:
            run.scope.cancel()

    # ================================================================================ completion
    async def _final_test(self, run: JobRun, model: dict[str, str]) -> dict[str, Any]:
        """The final model's metrics on the fixed test split (the same split on every node)."""
        try:
            return await self.d.worker_call("evaluate", {"job": run.spec, "state": model,
                                                         "data": self.d.data_spec.to_dict(), "split": "test"})
        except Exception as exc:  # noqa: BLE001 - completion must not hinge on the final evaluation
            log.warning("final_evaluation_failed", job=run.job_id, error=str(exc)[:200])
            return {}

    async def _complete(self, run: JobRun, base: JobState, test: dict[str, Any] | None = None) -> None:
        if test is None:
            test = await self._final_test(run, run.model)
        reason = "laps" if base.lap >= run.spec["laps"] else "target"
        rec = {"t": "complete", "job_id": run.job_id, "hop": base.hop, "attempt": base.attempt, "lap": base.lap,
               "lineage": base.lineage, "holder": self.me, "model": run.model, "reason": reason,
               "test": {k: float(v) for k, v in test.items() if isinstance(v, int | float)},
               "lap_metrics": [m for m in base.lap_metrics if m is not None], "at": time.time()}
        async with run.lock:
            run.completed = rec
            run.phase = "done"
            run.save_meta()
            run.save_checkpoint()
        self._record(run, "job_complete", base, detail={"reason": reason, "test": rec["test"]})
        log.info("job_complete", job=run.job_id, hops=base.hop + 1, laps=base.lap, reason=reason, test=rec["test"])
        self._update_profile()
        if base.prev_holder and base.prev_holder != self.me and not self.cs.is_coordinator(run):
            await self._send_release(base)
        assert self.nursery is not None
        self.nursery.start_soon(self._announce_complete, rec)

    async def _announce_complete(self, rec: dict[str, Any]) -> None:
        last = 0.0
        for at in COMPLETE_REPEATS_S:
            await trio.sleep(at - last)
            last = at
            if self.svc.gossip is not None:
                run = self.jobs.get(rec["job_id"])
                tail = [] if run is None else run.custody.chain(rec["lineage"], custody_mod.TAIL)
                await self.svc.gossip.publish("jobs", wire.packb({**rec, "custody": [x.to_wire() for x in tail]}))

    async def _on_complete(self, sender: str, obj: dict[str, Any], refetch: bool = True) -> None:
        f = wire.Fields(obj, "jobs")
        job_id = f.str("job_id", 16, pattern=wire.JOB_ID_RE)
        run = self.jobs.get(job_id)
        if run is None:
            return
        claim = Claim(f.int("lap"), f.int("hop"), f.int("attempt"), f.str("lineage", 64, pattern=wire.HEX64_RE))
        holder = f.str("holder", 64, pattern=wire.PEER_ID_RE)
        if holder != sender:
            raise wire.WireError("a completion announced by another node than its holder", "forged")
        # Only the holder of the final hop (or the CS coordinator that received it) may declare the job done:
        # its lineage must be proven back to the job's genesis (snake/custody.py).
        problem, missing = run.add_custody(decode_links(f, "custody", MAX_TAIL))
        if problem is not None:
            raise wire.WireError(f"completion custody: {problem}", "custody")
        if not run.custody.known(claim.lineage):
            if missing is not None and refetch:
                self._gap_fill_later(run, sender, claim.lineage, self._on_complete, obj)
                return
            raise wire.WireError("completion of a hop whose chain of custody is unknown here", "custody")
        link = run.custody.links[claim.lineage]
        if holder not in (link.holder, link.signer) or (link.hop, link.attempt) != (claim.hop, claim.attempt):
            raise wire.WireError("a completion by a node that did not hold that hop", "custody")
        rec = {"t": "complete", "job_id": job_id, "hop": claim.hop, "attempt": claim.attempt, "lap": claim.lap,
               "lineage": claim.lineage, "holder": holder,
               "model": decode_model_state(f), "reason": f.str("reason", 16),
               "test": {k: float(v) for k, v in (f.raw("test", required=False) or {}).items()
                        if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)},
               "lap_metrics": [], "at": f.float("at", 0, 1e11)}
        if set(rec["model"]) != set(run.schema) and run.schema:
            raise wire.WireError("completion names layers that are not the job's model", "unknown_layer")
        if run.completed is not None:
            old = Claim(run.completed["lap"], run.completed["hop"], run.completed["attempt"], run.completed["lineage"])
            if compare_claims(claim, old) <= 0:
                return
        run.observe(claim)
        run.completed = rec
        run.save_meta()
        log.info("job_complete_seen", job=job_id, holder=rec["holder"], hops=claim.hop + 1)
        self._update_profile()
        if run.state is not None and run.phase in HOLDING and run.state.lineage != claim.lineage:
            assert self.nursery is not None
            self.nursery.start_soon(self._supersede, run, run.state, claim.lineage, "the job completed elsewhere")

    # ================================================================================ hand-off
    def _rank(self, run: JobRun, base: JobState, excluded: dict[str, str]) -> routing.Ranking:
        return routing.rank(run.spec["routing"], base, self.me, self._candidates(), excluded=excluded,
                            min_memory_mb=self._min_memory(run))

    def _first_holder_state(self, run: JobRun, cand: str, size: int, attempt: int, members: set[str]) -> JobState:
        return st.start_job(run.job_id, members | {cand}, cand, min(size, run.blocks), run.blocks, attempt=attempt)

    async def _handoff(self, run: JobRun, base: JobState | None, model: dict[str, str]) -> None:
        """Propose, transfer, keep the baton; retry as the next attempt until a successor hands on."""
        spec = run.spec
        suggested = min(int(spec["window"]["max_blocks"]), run.blocks)
        attempt = 0
        excluded: dict[str, str] = {}
        transfer_failures: dict[str, int] = {}
        waited = 0.0
        blocked_since: dict[str, float] = {}
        lap_seen = None if base is None else base.lap
        start_members = self.members(run) - ({self.me} if not run.joined else set())
        while True:
            if run.completed is not None or run.phase == "superseded":
                return
            if base is not None and run.highest is not None and compare_claims(run.highest, base.claim) > 0 \
                    and not run.descends(run.highest.lineage, base.lineage):
                # A rival lineage is ahead (a zombie successor carried on, or a healed partition): stop.
                run.phase = "superseded"
                run.save_checkpoint()
                self.counters.add("snake.superseded")
                self._record(run, "superseded", base, detail={"by": run.highest.lineage,
                                                              "why": "a later claim of another lineage"})
                log.warning("superseded", job=run.job_id, hop=base.hop, by=run.highest.lineage[:16])
                return
            members = self.members(run)
            if base is not None:
                async with run.lock:
                    before = set(base.dropped)
                    base = st.drop_down(base, self._down_for(base), spec=spec, members=members or {self.me})
                    run.state = base
                for peer in sorted(set(base.dropped) - before):
                    self._record(run, "dropped", base, detail={"peer": peer, "reason": "down"})
                    log.info("member_dropped", job=run.job_id, peer=peer, why="down")
                if await self._lap_closed_by_drops(run, base, lap_seen):
                    return
                lap_seen = base.lap
                ranking = self._rank(run, base, excluded)
            else:
                # Hop 0 proposed by a submitter that does not train: rank the members as if this node had
                # just finished a hop of a lap they all still have to visit.
                pool = (start_members or members) | {self.me}
                provisional = st.start_job(run.job_id, pool, self.me, 1, run.blocks)
                ranking = self._rank(run, st.finish_hop(provisional, metric=None, members=pool), excluded)
            if not ranking.choices:
                if base is not None and st.lap_remaining(base) == [self.me]:
                    # This lap has no other member (alone, or the others were dropped): train here.
                    await self._self_hop(run, base, model, run.next_attempt(base.hop + 1, attempt))
                    return
                if base is not None:
                    base = await self._drop_blocked(run, base, ranking, blocked_since, members)
                    if not st.lap_remaining(base) and base.finished:
                        continue  # the drops closed the lap: rank again for the next one
                waited += WAIT_TICK_S
                if waited >= 5.0:
                    # Soft exclusions (busy, timeouts) expire: the network may have changed.
                    excluded = {p: r for p, r in excluded.items() if r in ("failed",)}
                    waited = 0.0
                self.svc.set_state("waiting", run.job_id, None if base is None else base.hop)
                await trio.sleep(WAIT_TICK_S)
                continue
            waited = 0.0
            cand = ranking.choices[0].peer_id
            attempt = run.next_attempt(0 if base is None else base.hop + 1, attempt)
            if base is None:
                proposal = self._first_holder_state(run, cand, suggested, attempt, start_members or members)
            else:
                proposal = st.after_hop(base, cand, suggested, spec=spec, attempt=attempt)
            self._certify(run, proposal)
            self._record(run, "proposed", proposal, detail={"score": ranking.choices[0].score,
                                                            "reasons": ranking.choices[0].reasons})
            # The fast bulk lane (docs/PROTOCOL.md): offered when the whole model reaches the threshold; used
            # when the Accept carries an offer and the bytes actually planned reach it too.
            cert = None
            if self.d.lane is not None and self._model_bytes(run, model) >= max(1, self._lane_threshold()):
                cert = lane_mod.LaneCert.generate()
            reply, negotiate_bytes, via = await self._propose(run, cand, proposal, model, cert)
            if isinstance(reply, Decline) or reply is None:
                reason = "timeout" if reply is None else reply.reason
                self._record(run, "declined", proposal, bytes={"negotiate": negotiate_bytes},
                             detail={"reason": reason, "detail": "" if reply is None else reply.detail})
                excluded[cand] = "declined" if reply is not None else "timeout"
                if reply is None or (isinstance(reply, Decline) and reply.reason == "stale"):
                    attempt += 1  # a lost Accept may have reserved the candidate: fence it off
                if base is not None:
                    async with run.lock:
                        before = set(base.dropped)
                        base = st.record_decline(base, cand, spec=spec, members=members or {self.me})
                        run.state = base
                    for peer in set(base.dropped) - before:
                        self._record(run, "dropped", base, detail={"peer": peer, "reason": "declines"})
                continue
            if base is None:
                proposal = st.start_job(run.job_id, proposal.lap_members, cand, reply.size, run.blocks,
                                        attempt=proposal.attempt)
            else:
                proposal = st.resize(proposal, reply.size)
            items = self._plan(run, model, reply)
            self._record(run, "accepted", proposal, bytes={"negotiate": negotiate_bytes}, detail={
                "planned_bytes": sum(it.entry.size - it.offset for it in items), "layers": len(items),
                "held": len(reply.held), "resumed_bytes": sum(it.offset for it in items)})
            offer = reply.lane if cert is not None else None
            ok, sent, path = await self._transfer(run, cand, proposal, model, items, offer, cert, via)
            if ok is None:
                # The receiver's poisoning guard refused the model: a Decline(poison_suspect); route on.
                self._record(run, "declined", proposal, detail={"reason": "poison_suspect"})
                excluded[cand] = "declined"
                attempt = proposal.attempt + 1
                continue
            if not ok:
                transfer_failures[cand] = transfer_failures.get(cand, 0) + 1
                if transfer_failures[cand] >= 2:
                    excluded[cand] = "transfer"
                attempt = proposal.attempt + 1
                self.counters.add("snake.retry.transfer")
                self._record(run, "retry", proposal, detail={"failed_holder": cand, "why": "transfer"})
                continue
            t_handoff = time.time()
            self._record(run, "handoff", proposal, bytes={"bundle_out": sent, "negotiate": negotiate_bytes},
                         t_handoff=t_handoff, detail=path)
            self._record(run, "committed", proposal)
            if proposal.attempt > 0:
                self._record(run, "reassigned", proposal, detail={"new_holder": cand})
            baton = Baton(base, proposal, cand, dict(model), lease_deadline=time.monotonic() + LEASE_TIMEOUT_S)
            async with run.lock:
                run.baton = baton
                run.phase = "baton"
                run.save_checkpoint()
            if self.active == run.job_id:
                self.active = None
            self._set_idle()
            if base is not None and base.prev_holder and base.prev_holder != self.me \
                    and not self.cs.is_coordinator(run):
                await self._send_release(base)
            outcome = await self._watch_baton(run, baton)
            if outcome == "released":
                self._record(run, "released", proposal)
                async with run.lock:
                    if run.baton is baton:
                        run.baton = None
                    if run.phase == "baton":
                        run.phase = "idle"
                    run.save_checkpoint()
                self._gc()
                return
            if outcome == "superseded":
                return
            # The successor is lost: retry this hop as the next attempt, elsewhere.
            excluded[cand] = "failed"
            attempt = proposal.attempt + 1
            self.counters.add(f"snake.retry.{outcome}")
            log.warning("successor_lost", job=run.job_id, hop=proposal.hop, attempt=proposal.attempt,
                        successor=cand, why=outcome)
            self._record(run, "retry", proposal, detail={"failed_holder": cand, "why": outcome})
            run.phase = "handing_off"

    async def _lap_closed_by_drops(self, run: JobRun, base: JobState, lap_seen: int | None) -> bool:
        """Drops (down, declines, blocked) can close a lap without a hop: log it, and finish the job
        here when that was its last lap. Returns True when the job completed."""
        if lap_seen is None or base.lap <= lap_seen:
            return False
        self._record(run, "lap_complete", base, detail={"metric": base.lap_metrics[-1], "closed_by": "drops"})
        if st.job_done(base, run.spec):
            await self._complete(run, base)
            return True
        return False

    async def _drop_blocked(self, run: JobRun, base: JobState, ranking: routing.Ranking,
                            blocked_since: dict[str, float], members: set[str]) -> JobState:
        """Lap members that are alive but cannot take the hop must not block the lap forever: one that
        cannot fit a window (no_memory) or left the job is dropped at once, one that stays busy (or
        otherwise ineligible) longer than lap.drop_after_s is dropped then. Down members are drop_down's."""
        now = time.monotonic()
        limit = float(run.spec["lap"]["drop_after_s"])
        remaining = set(st.lap_remaining(base))
        for ex in ranking.excluded:
            if ex.peer_id not in remaining or ex.reason in ("down", "self"):
                blocked_since.pop(ex.peer_id, None)
                continue
            since = blocked_since.setdefault(ex.peer_id, now)
            if ex.reason in ("no_memory", "not_joined") or now - since >= limit:
                async with run.lock:
                    base = st.drop_member(base, ex.peer_id, "declines", members=members or {self.me})
                    run.state = base
                blocked_since.pop(ex.peer_id, None)
                self.counters.add("snake.dropped.blocked")
                self._record(run, "dropped", base, detail={"peer": ex.peer_id, "reason": "declines",
                                                           "why": ex.reason})
                log.info("member_dropped", job=run.job_id, peer=ex.peer_id, why=ex.reason)
        return base

    async def _self_hop(self, run: JobRun, base: JobState, model: dict[str, str], attempt: int) -> None:
        """The only member left in this lap: take the next hop here (no transfer)."""
        size = self._my_window_size(run, base.window) or int(run.spec["window"]["min_blocks"])
        async with run.lock:
            nxt = st.after_hop(base, self.me, min(size, run.blocks), spec=run.spec, attempt=attempt)
            self._certify(run, nxt)
            run.state, run.model, run.phase = nxt, dict(model), "received"
            run.observe(nxt.claim)
            run.save_checkpoint()
        self._record(run, "received", nxt, t_recv=time.time(), detail={"self_hop": True})
        self.active = run.job_id  # before the current hop's task unwinds, so no proposal slips in
        assert self.nursery is not None
        self.nursery.start_soon(self._hold, run)

    def _model_bytes(self, run: JobRun, model: dict[str, str]) -> int:
        return sum(run.schema[n].size for n in model if n in run.schema)

    async def _propose(self, run: JobRun, cand: str, proposal: JobState, model: dict[str, str],
                       lane_cert: lane_mod.LaneCert | None = None) -> tuple[Accept | Decline | None, int, str | None]:
        """(reply, negotiate bytes, the IP address of the connection the negotiation ran on)."""
        self.faults.check("propose", hop=proposal.hop, attempt=proposal.attempt, job=run.job_id)
        msg = Propose(run.job_id, run.signed.encode(), proposal, proposal.window.size, model,
                      None if lane_cert is None else lane_cert.der,
                      run.custody.chain(proposal.lineage, custody_mod.TAIL))
        io = None
        assign = self.cs.is_coordinator(run) and not run.fallback
        try:
            with trio.fail_after(PROPOSE_TIMEOUT_S):
                io = await host_mod.open_stream(self.svc.host, cand, wire.PROTO_CS if assign else wire.PROTO_NEGOTIATE,
                                                self.counters, "cs" if assign else "negotiate")
                await io.write_frame({**msg.to_wire(), "t": "assign"} if assign else msg.to_wire())
                kind, f = await io.read_frame()
            if kind == "accept":
                acc = Accept.from_wire(f)
                if (acc.job_id, acc.hop, acc.attempt) != (run.job_id, proposal.hop, proposal.attempt):
                    raise wire.WireError("accept does not match the proposal", "unexpected")
                return acc, io.bytes_in + io.bytes_out, lane_mod.remote_host(io)
            if kind == "decline":
                return Decline.from_wire(f), io.bytes_in + io.bytes_out, None
            raise wire.WireError(f"expected accept or decline, got {kind!r}", "unexpected")
        except (trio.TooSlowError, wire.WireError, Exception) as exc:  # noqa: BLE001 - any failure: next candidate
            self.counters.add("snake.propose.failed")
            log.info("propose_failed", job=run.job_id, hop=proposal.hop, peer=cand, error=f"{type(exc).__name__}: {exc}"[:200])
            return None, 0 if io is None else io.bytes_in + io.bytes_out, None
        finally:
            if io is not None:
                await io.close()

    def _entries(self, run: JobRun, model: dict[str, str]) -> list[bundle_mod.LayerEntry]:
        return [bundle_mod.LayerEntry(n, h, run.schema[n].size, run.schema[n].tensors)
                for n, h in sorted(model.items())]

    def _plan(self, run: JobRun, model: dict[str, str], acc: Accept) -> list[transfer.SendItem]:
        return transfer.plan_send(self._entries(run, model), set(acc.held), acc.partial)

    def _lane_hosts(self, peer: str, via: str | None) -> list[str]:
        """Where to dial a peer's lane: the address of the connection we negotiated on, else its profile's IPs."""
        if via:
            return [via]
        e = self.svc.table.entries.get(peer)
        addrs = [*((e.profile or {}).get("addrs", []) if e is not None else []), *(e.addrs if e else [])]
        return list(dict.fromkeys(a.split("/")[2] for a in addrs if a.split("/")[1:2] in (["ip4"], ["ip6"])))

    async def _transfer(self, run: JobRun, cand: str, proposal: JobState, model: dict[str, str],
                        items: list[transfer.SendItem], offer: lane_mod.LaneOffer | None = None,
                        cert: lane_mod.LaneCert | None = None, via: str | None = None
                        ) -> tuple[bool | None, int, dict[str, Any]]:
        """(True, bytes, path) on commit; (False, _, _) on a failure worth retrying; (None, _, _) when the
        receiver's poisoning guard refused the model. `path` says how the bytes went ({"path": "lane"} or
        "libp2p", with "fallback": reason when the lane was offered but could not connect). With an offer
        and at least lane_min_mb to send, the bytes go over the lane, falling back to the libp2p stream."""
        manifest = bundle_mod.LayerBundle(run.job_id, proposal.to_dict(), self._entries(run, model))
        io = None
        self.svc.set_state("sending", run.job_id, proposal.hop - 1 if proposal.hop else None)
        planned = sum(it.entry.size - it.offset for it in items)
        ctx = {"hop": proposal.hop, "job": run.job_id}
        use_lane = offer is not None and cert is not None and planned > 0 and planned >= self._lane_threshold()
        path: dict[str, Any] = {"path": "libp2p"}
        try:
            if use_lane:
                assert offer is not None and cert is not None

                async def libp2p_stream() -> host_mod.StreamIO:
                    return await host_mod.open_stream(self.svc.host, cand, wire.PROTO_BUNDLE, self.counters,
                                                      "bundle")

                res = await lane_mod.send_over_lane(self._lane_hosts(cand, via), offer, cert, manifest, self.store,
                                                    items, counters=self.counters, fallback=libp2p_stream,
                                                    peer=cand, rate=self.faults.rate, faults=self.faults, ctx=ctx)
                path = {"path": res["path"], **({"fallback": res["fallback"]} if res.get("fallback") else {})}
            else:
                io = await host_mod.open_stream(self.svc.host, cand, wire.PROTO_BUNDLE, self.counters, "bundle")
                res = await transfer.send_bundle(io, manifest, self.store, items, rate=self.faults.rate,
                                                 faults=self.faults, ctx=ctx,
                                                 pack_bf16=run.spec.get("transfer_dtype") == "bf16")
            log.info("bundle_sent", job=run.job_id, hop=proposal.hop, to=cand, layers=len(items),
                     bytes=res["bytes"], seconds=round(res["seconds"], 3), **path)
            return True, int(res["bytes"]), path
        except transfer.TransferError as exc:
            self.counters.add("snake.transfer.failed")
            log.warning("bundle_failed", job=run.job_id, hop=proposal.hop, to=cand, kind=exc.kind,
                        lane=use_lane, error=str(exc)[:300])
            return (None if exc.kind == "poison_suspect" else False), 0 if io is None else io.bytes_out, path
        except Exception as exc:  # noqa: BLE001 - any failure: re-propose (resumes) or move on
            self.counters.add("snake.transfer.failed")
            log.warning("bundle_failed", job=run.job_id, hop=proposal.hop, to=cand, lane=use_lane,
                        error=f"{type(exc).__name__}: {exc}"[:300])
            return False, 0 if io is None else io.bytes_out, path
        finally:
            if io is not None:
                await io.close()

    async def _watch_baton(self, run: JobRun, baton: Baton) -> str:
        """Returns released, superseded, lease (lapsed) or disconnect."""
        gone_at: float | None = None
        while True:
            if baton.released:
                return "released"
            if run.completed is not None:
                return "released"
            if run.phase == "superseded":
                return "superseded"
            now = time.monotonic()
            if not self.svc.table.is_live(baton.successor):
                gone_at = gone_at or now
                if now - gone_at >= DISCONNECT_GRACE_S:
                    async with run.lock:
                        if not baton.released:
                            baton.retrying = True
                            return "disconnect"
                        return "released"
            else:
                gone_at = None
            if now > baton.lease_deadline:
                async with run.lock:
                    if not baton.released:
                        baton.retrying = True
                        return "lease"
                    return "released"
            with trio.move_on_after(0.25):
                await baton.event.wait()

    async def _send_release(self, state: JobState) -> None:
        assert state.prev_holder is not None
        try:
            await self._state_request(state.prev_holder, ClaimRef.of(state).to_wire("release"))
        except Exception:  # noqa: BLE001 - a gone predecessor has nothing left to release
            self.counters.add("snake.release.unreachable")

    def _gc(self) -> None:
        keep: set[str] = set()
        for r in self.jobs.values():
            keep |= r.referenced_hashes()
        removed = self.store.gc(keep)
        if removed:
            log.debug("store_gc", removed=removed)

    # ================================================================================ receiving side
    def _decline(self, job_id: str, reason: str, detail: str = "") -> Decline:
        self.counters.add(f"snake.decline.{reason}")
        log.info("declined", job=job_id, reason=reason, detail=detail[:200])
        return Decline(job_id, reason, detail)

    async def _consider(self, peer: str, p: Propose) -> Accept | Decline:
        action = self.faults.check("accept", hop=p.state.hop, attempt=p.state.attempt, job=p.job_id)
        if action == "decline":
            return self._decline(p.job_id, "test_fault", "declining on purpose (--test-faults)")
        if action == "hang":
            await trio.sleep(PROPOSE_TIMEOUT_S * 2)
        run = self.jobs.get(p.job_id)
        if run is None:
            try:
                signed = SignedJob.decode(p.job)
                if signed.job_id != p.job_id:
                    return self._decline(p.job_id, "bad_job", "the signed job has another id")
                verify_job(signed, self.trusted())
            except JobRejected as exc:
                self.counters.add(f"reject.job.{exc.reason}")
                return self._decline(p.job_id, "untrusted" if exc.reason == "untrusted_submitter" else "bad_job",
                                     str(exc))
            run = self.intake(signed)
        if not run.joined:
            return self._decline(p.job_id, "not_joined", run.join_reason)
        why = self.cs.may_assign(run, peer)
        if why is not None:
            self.counters.add("reject.cs.not_coordinator")
            return self._decline(p.job_id, "not_coordinator", why)
        if not run.ready.is_set():
            return self._decline(p.job_id, "not_ready", run.error or "the job's model is still being built here")
        if p.state.holder != self.me:
            return self._decline(p.job_id, "error", "the proposal names another holder")
        if run.completed is not None:
            return self._decline(p.job_id, "stale", "the job is complete")
        if run.highest is not None and compare_claims(p.state.claim, run.highest) < 0 and \
                p.state.parent_lineage != run.highest.lineage:
            return self._decline(p.job_id, "stale", f"a later claim is known: hop {run.highest.hop} "
                                                    f"attempt {run.highest.attempt} {run.highest.lineage}")
        why = await self._accept_custody(run, peer, p.custody, p.state.lineage)
        if why is None and run.custody.links[p.state.lineage].signer != peer:
            why = (f"the hand-over of hop {p.state.hop} was signed by {run.custody.links[p.state.lineage].signer}, "
                   f"not by the proposer")
        if why is not None:
            self.counters.add("reject.negotiate.custody")
            return self._decline(p.job_id, "custody", why)
        if self.active is not None:
            return self._decline(p.job_id, "busy", f"holding a hop of job {self.active}")
        r = self.reservation
        if r is not None and time.monotonic() < r.expires and not (
                r.run.job_id == p.job_id and r.state.hop == p.state.hop):
            return self._decline(p.job_id, "busy", f"reserved for job {r.run.job_id} hop {r.state.hop}")
        size = self._my_window_size(run, p.state.prev_window)
        if size is None:
            return self._decline(p.job_id, "memory", f"no window of {run.spec['window']['min_blocks']}+ blocks fits "
                                                     f"{self.cfg.memory_mb} MB and {run.spec['window']['hop_time_s']} s")
        try:
            state = st.resize(p.state, size)
        except (st.StateError, ValueError) as exc:
            return self._decline(p.job_id, "error", f"cannot take the window: {exc}")
        if p.state.hop == 0:
            # hop 0 has no previous window: the size is all there is to decide.
            state = st.start_job(run.job_id, p.state.lap_members, self.me, size, run.blocks,
                                 attempt=p.state.attempt)  # the sender builds the same state on Accept
        self._cancel_lane(self.reservation)
        self.reservation = Reservation(run, state, peer)
        offer = None
        if p.lane is not None and self.d.lane is not None:
            # The lane offer is bound to the Noise-authenticated proposer and to its certificate.
            offer = self.d.lane.expect(peer, p.lane, self._serve_bundle,
                                       advertise_port=self.cfg.lane_announce_port or None)
            self.reservation.lane_id = offer.lane_id
        run.phase = "reserved"
        self.svc.set_state("reserved", run.job_id, state.hop)
        hashes = set(p.layers.values())
        held = sorted(h for h in hashes if self.store.has(h))
        partial = {h: self.store.partial_offset(h) for h in hashes - set(held) if self.store.partial_offset(h) > 0}
        log.info("accepted", job=run.job_id, hop=state.hop, attempt=state.attempt, size=size, frm=peer,
                 held=len(held), resume=len(partial))
        return Accept(run.job_id, state.hop, state.attempt, size, held, partial, offer)

    async def _serve_negotiate(self, io: host_mod.StreamIO) -> None:
        kind, f = await io.read_frame(limit=2 * 2**20)
        if kind != "propose":
            raise wire.WireError(f"expected propose, got {kind!r}", "unexpected")
        await self._negotiate(io, f)

    async def _negotiate(self, io: host_mod.StreamIO, f: wire.Fields) -> None:
        """Answer a Propose (P2P) or an Assign (CS: the same message from the coordinator)."""
        p = Propose.from_wire(f)
        reply = await self._consider(io.peer, p)
        await io.write_frame(reply.to_wire())

    async def _poison_check(self, run: JobRun, state: JobState, model: dict[str, str]) -> str | None:
        """Why an incoming model looks poisoned, or None. Hard check: no layer moved more than
        guard.max_rel_change times its norm since the version this node last held. From the second lap on:
        its local validation loss is at most guard.val_loss_factor times the previous incoming model's."""
        g = run.spec["guard"]
        if not g["enabled"]:
            return None
        prev = run.model or run.init_state
        for name, h in sorted(model.items()):
            old = prev.get(name)
            if old is None or old == h or not self.store.has(old):
                continue
            try:
                rc = await trio.to_thread.run_sync(bundle_mod.relative_change, self.store.get_bytes(old),
                                                   self.store.get_bytes(h), name)
            except bundle_mod.BundleError as exc:
                return f"layer {name}: {exc}"
            if rc > g["max_rel_change"]:
                return f"layer {name} moved {rc:.3g}x its norm since this node last held it (limit {g['max_rel_change']:g})"
        if self.d.data_spec is None:
            return None
        try:
            res = await self.d.worker_call("evaluate", {"job": run.spec, "state": model,
                                                        "data": self.d.data_spec.to_dict(), "split": "val"})
        except Exception as exc:  # noqa: BLE001 - the guard must not refuse honest work on a local failure
            log.warning("poison_check_unavailable", job=run.job_id, error=str(exc)[:200])
            return None
        loss = float(res.get("loss", float("nan")))
        prev_loss = run.incoming_loss
        if state.lap >= 1 and prev_loss is not None and loss == loss and loss > g["val_loss_factor"] * prev_loss:
            return (f"validation loss {loss:.4g} is over {g['val_loss_factor']:g}x that of the previous incoming "
                    f"model ({prev_loss:.4g})")
        if loss == loss:
            run.incoming_loss = loss
        return None

    async def _serve_bundle(self, io: host_mod.StreamIO | lane_mod.LaneIO) -> None:
        """A bundle on `/snake/bundle/1.0.0`, or on the fast bulk lane (a LaneIO whose `peer` is the proposer
        the lane offer was made to): the same checks either way."""
        on_lane = isinstance(io, lane_mod.LaneIO)
        kind, f = await io.read_frame(limit=bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024)
        if kind != "bundle":
            raise wire.WireError(f"expected bundle, got {kind!r}", "unexpected")
        try:
            incoming = transfer.decode_incoming(f)
        except transfer.TransferError as exc:
            raise wire.WireError(str(exc), exc.kind) from None
        m = incoming.manifest
        try:
            state = JobState.from_dict(m.job_state)
        except (st.StateError, ValueError, TypeError, KeyError) as exc:
            raise wire.WireError(f"bad job_state in the manifest: {exc}", "bad_state") from None
        r = self.reservation
        if r is None or r.run.job_id != m.job or r.proposer != io.peer:
            raise wire.WireError("no proposal from you is pending here (negotiate first)", "not_proposed")
        if state.to_dict() != r.state.to_dict():
            raise wire.WireError(f"the manifest's job_state (hop {state.hop} attempt {state.attempt}) is not the "
                                 f"accepted one (hop {r.state.hop} attempt {r.state.attempt})", "stale")
        if not on_lane:
            self._cancel_lane(r)  # the sender chose (or fell back to) libp2p: the offer will not be used
        run = r.run
        try:
            m.check_against(run.schema)
        except bundle_mod.BundleError as exc:
            raise wire.WireError(str(exc), exc.code) from None
        if {e.name for e in m.layers} != set(run.schema):
            raise wire.WireError("the manifest does not list every layer of the model", "unknown_layer")
        r.expires = time.monotonic() + RESERVATION_S
        run.phase = "receiving"
        self.svc.set_state("receiving", run.job_id, state.hop)
        try:
            received = await lane_mod.receive_layers(io, incoming, run.schema, self.store, faults=self.faults,
                                                     ctx={"hop": state.hop, "job": run.job_id})
        except transfer.TransferError as exc:
            run.phase = "reserved"
            self.svc.set_state("reserved", run.job_id, state.hop)  # routable again, not stuck "receiving"
            raise wire.WireError(str(exc), exc.kind) from None
        model = {e.name: e.hash for e in m.layers}
        missing = [n for n, h in model.items() if not self.store.has(h)]
        if missing:
            run.phase = "reserved"
            raise wire.WireError(f"layers {missing[:5]} were neither sent nor held here", "incomplete")
        suspect = await self._poison_check(run, state, model)
        if suspect is not None:
            self.counters.add("snake.poison_suspect")
            log.warning("poison_suspect", job=run.job_id, hop=state.hop, frm=io.peer, why=suspect)
            self._record(run, "declined", state, detail={"reason": "poison_suspect", "detail": suspect,
                                                         "by": self.me})
            if self.reservation is r:
                self.reservation = None
                run.phase = "idle"
                self._set_idle()
            raise wire.WireError(f"poison_suspect: {suspect}", "poison_suspect")
        async with run.lock:
            if self.reservation is not r:
                raise wire.WireError("the reservation was replaced by a later proposal", "stale")
            run.state, run.model, run.phase = state, model, "received"
            run.observe(state.claim)
            run.save_checkpoint()
            self.reservation = None
            self.active = run.job_id
        await io.write_frame({"t": "ack", "job_id": run.job_id, "hop": state.hop, "attempt": state.attempt,
                              "bytes": received})
        path = "lane" if on_lane else "libp2p"
        self._record(run, "received", state, t_recv=time.time(), bytes={"bundle_in": received},
                     detail={"path": path})
        log.info("bundle_received", job=run.job_id, hop=state.hop, attempt=state.attempt, frm=io.peer,
                 bytes=received, path=path)
        assert self.nursery is not None
        self.nursery.start_soon(self._hold, run)

    # ================================================================================ state protocol
    async def _state_request(self, peer: str, msg: dict[str, Any]) -> tuple[str, wire.Fields]:
        with trio.fail_after(STATE_TIMEOUT_S):
            io = await host_mod.open_stream(self.svc.host, peer, wire.PROTO_STATE, self.counters, "state")
            try:
                await io.write_frame(msg)
                kind, f = await io.read_frame(limit=8 * 2**20)
            finally:
                await io.close()
        if kind == "error":
            raise ControlError(f.str("error", 1000, required=False), f.str("kind", 64, required=False))
        return kind, f

    async def _serve_state(self, io: host_mod.StreamIO) -> None:
        kind, f = await io.read_frame(limit=64 * 1024)
        if kind in ("lease", "release", "resume_query"):
            ref = ClaimRef.from_wire(f)
            run = self.jobs.get(ref.job_id)
            if run is None:
                await io.write_frame({"t": "unknown", "reason": "job unknown here"})
                return
            await io.write_frame(await getattr(self, f"_on_{kind}")(run, ref, io.peer))
        elif kind == "get_records":
            run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
            own = _own_records(run) if run is not None else []
            await io.write_frame({"t": "records", "records": own[-20_000:]})
        elif kind == "get_job":
            run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
            if run is None:
                await io.write_frame({"t": "unknown", "reason": "job unknown here"})
            else:
                await io.write_frame({"t": "job", "job": run.signed.encode()})
        elif kind == "checkpoint_query":
            run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
            await io.write_frame(self._checkpoint_view(run))
        elif kind == "get_layers":
            await self._serve_layers(io, decode_layer_list(f))
        elif kind == "get_custody":
            run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
            lineage = f.str("lineage", 64, pattern=wire.HEX64_RE)
            chain = [] if run is None else run.custody.chain(lineage)
            if not chain or chain[0].parent != run.custody.genesis:  # type: ignore[union-attr]
                await io.write_frame({"t": "unknown", "reason": "no chain of custody for that lineage here"})
            else:
                await io.write_frame({"t": "custody", "links": [link.to_wire() for link in chain]})
        elif kind == "resume_cmd":
            job_id = f.str("job_id", 16, pattern=wire.JOB_ID_RE)
            await io.write_frame(await self.resume_local(job_id))
        else:
            raise wire.WireError(f"unknown state message {kind!r}", "unexpected")

    async def _on_lease(self, run: JobRun, ref: ClaimRef, peer: str) -> dict[str, Any]:
        b = run.baton
        if b is None or b.released:
            return {"t": "lease_unknown"}
        if b.proposed.hop == ref.hop and b.proposed.lineage == ref.lineage and b.successor == peer:
            if b.retrying:
                return {"t": "lease_revoked", "reason": "the hop was reassigned", "by": ""}
            b.lease_deadline = time.monotonic() + LEASE_TIMEOUT_S
            return {"t": "lease_ok"}
        if b.proposed.hop == ref.hop and b.proposed.attempt > ref.attempt:
            return {"t": "lease_revoked", "reason": f"hop {ref.hop} was reassigned (attempt {b.proposed.attempt})",
                    "by": b.proposed.lineage}
        return {"t": "lease_unknown"}

    async def _on_release(self, run: JobRun, ref: ClaimRef, peer: str) -> dict[str, Any]:
        b = run.baton
        if b is not None and b.proposed.lineage == ref.lineage:
            b.released = True
            b.event.set()
        return {"t": "ok"}

    async def _on_resume_query(self, run: JobRun, ref: ClaimRef, peer: str) -> dict[str, Any]:
        async with run.lock:
            b = run.baton
            if b is not None and not b.released and b.proposed.lineage == ref.lineage and b.successor == peer:
                if b.retrying:
                    return {"t": "verdict", "verdict": "superseded", "by": ""}
                b.lease_deadline = time.monotonic() + LEASE_TIMEOUT_S
                return {"t": "verdict", "verdict": "resume"}
            if b is not None and b.proposed.hop == ref.hop and b.proposed.attempt > ref.attempt:
                return {"t": "verdict", "verdict": "superseded", "by": b.proposed.lineage}
        if run.highest is not None and compare_claims(run.highest, Claim(0, ref.hop, ref.attempt, ref.lineage)) > 0 \
                and run.highest.hop >= ref.hop and run.highest.lineage != ref.lineage:
            return {"t": "verdict", "verdict": "unknown", "highest": run.highest.lineage}
        return {"t": "verdict", "verdict": "unknown"}

    # ================================================================================ progress gossip
    def _gap_fill_later(self, run: JobRun, sender: str, lineage: str, handler: Any, obj: dict[str, Any]) -> None:
        """A claim whose chain of custody has a gap here (a late joiner, lost gossip, a healed partition):
        fetch the chain from its author in the background, then handle the message again (once)."""
        key = (run.job_id, lineage)
        if key in self._custody_pending or len(self._custody_pending) >= 64 or self.nursery is None:
            self.counters.add("custody.fetch_skipped")
            return
        self._custody_pending.add(key)

        async def fill() -> None:
            try:
                why = await self._accept_custody(run, sender, [], lineage)
                if why is None:
                    await handler(sender, obj, refetch=False)
                else:
                    self.counters.add("reject.custody.unproven")
                    log.warning("custody_unproven", job=run.job_id, frm=sender, lineage=lineage[:16], why=why[:200])
            except wire.WireError as exc:
                self.counters.add(f"reject.custody.{exc.kind}")
                log.warning("custody_refused", job=run.job_id, frm=sender, error=str(exc)[:200])
            except Exception as exc:  # noqa: BLE001 - runs in the node's nursery: never take the node down
                self.counters.add("error.custody.handler")
                log.error("custody_handler_failed", job=run.job_id, frm=sender, error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                self._custody_pending.discard(key)

        self.nursery.start_soon(fill)

    async def _on_progress_msg(self, sender: str, obj: dict[str, Any], refetch: bool = True) -> None:
        f = wire.Fields(obj, "progress")
        if f.str("t", 16) != "progress":
            raise wire.WireError("unknown progress message", "unexpected")
        rec = f.raw("rec")
        problems = hoplog.validate_record(rec)
        if problems:
            raise wire.WireError("bad hop record: " + "; ".join(problems[:3]), "bad_record")
        if rec["node"] != sender:
            raise wire.WireError("hop record written by another node than the sender", "forged")
        run = self.jobs.get(rec["job_id"])
        if run is None:
            return
        # The record counts only when its lineage is proven: its hand-over certificate (`cust`, the signer and
        # signature; the rest of the link is in the record), and a chain back to the job's genesis.
        cust = f.raw("cust", required=False)
        if not (isinstance(cust, list) and len(cust) == 2):
            raise wire.WireError("hop record without its custody link (cust)", "custody")
        try:
            link = custody_mod.Link.from_wire([bytes.fromhex(str(rec["parent_lineage"])), rec["hop"], rec["attempt"],
                                               rec["holder"], cust[0], cust[1]])
            if link.lineage != rec["lineage"]:
                raise custody_mod.CustodyError("the record's lineage is not its (parent, hop, attempt, holder)")
        except (custody_mod.CustodyError, st.StateError, ValueError) as exc:
            raise wire.WireError(f"hop record custody: {exc}", "custody") from None
        if rec["node"] not in (link.holder, link.signer):
            raise wire.WireError("hop record written by neither the holder nor the signer of its hop", "custody")
        problem, missing = run.add_custody([link])
        if problem is not None:
            raise wire.WireError(f"hop record custody: {problem}", "custody")
        if missing is not None:
            if refetch:
                self._gap_fill_later(run, sender, rec["lineage"], self._on_progress_msg, obj)
            return
        run.log_seen(rec)
        claim = Claim(rec["lap"], rec["hop"], rec["attempt"], rec["lineage"])
        if rec["event"] in ("proposed", "declined", "accepted"):
            return  # proposals are not claims until committed
        run.observe(claim)
        # Our successor's successor holds the snake (its release message may have been lost): drop the baton.
        b = run.baton
        if b is not None and not b.released and rec["hop"] >= b.proposed.hop + 1 and \
                rec["event"] in ("committed", "received", "trained") and \
                run.descends(rec["lineage"], b.proposed.lineage):
            b.released = True
            b.event.set()
        s = run.state
        if s is None or run.phase not in HOLDING:
            return
        if run.descends(rec["lineage"], s.lineage) or rec["lineage"] in s.ancestry:
            return
        if compare_claims(claim, s.claim) > 0:
            assert self.nursery is not None
            self.nursery.start_soon(self._supersede, run, s, rec["lineage"],
                                    f"{rec['event']} of hop {rec['hop']} attempt {rec['attempt']} wins")

    # ================================================================================ restart recovery
    async def _recover(self, run: JobRun) -> None:
        """After a restart: resume what this node held, unless a later attempt or lineage superseded it."""
        if run.completed is not None or run.state is None:
            return
        with trio.move_on_after(60):
            await run.ready.wait()
        if run.phase == "baton" and run.baton is not None:
            b = run.baton
            b.lease_deadline = time.monotonic() + LEASE_TIMEOUT_S
            log.info("baton_restored", job=run.job_id, hop=b.proposed.hop, successor=b.successor)
            await self._continue_handoff(run, b)
            return
        if run.phase not in HOLDING:
            return
        state = run.state
        verdict = await self._ask_resume(run, state)
        if verdict != "resume":
            async with run.lock:
                run.phase = "superseded"
                run.save_checkpoint()
            self._record(run, "superseded", state, detail={"by": verdict, "why": "found at restart"})
            log.warning("superseded", job=run.job_id, hop=state.hop, why="found at restart", verdict=verdict)
            return
        await self._resume_holding(run)

    async def _resume_holding(self, run: JobRun) -> None:
        state = run.state
        assert state is not None
        self._record(run, "resumed", state, detail={"phase": run.phase})
        log.info("resumed", job=run.job_id, hop=state.hop, phase=run.phase)
        self.active = run.job_id
        assert self.nursery is not None
        if run.phase in ("trained", "handing_off") and state.finished:
            self.nursery.start_soon(self._resume_handoff, run, state)
        else:
            run.phase = "received"
            self.nursery.start_soon(self._hold, run)

    async def _resume_handoff(self, run: JobRun, base: JobState) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._lease_loop, run, base)
                run.phase = "handing_off"
                if st.job_done(base, run.spec):
                    await self._complete(run, base)
                else:
                    await self._handoff(run, base, dict(run.model))
                nursery.cancel_scope.cancel()
        finally:
            if self.active == run.job_id:
                self.active = None
            self._set_idle()

    async def _continue_handoff(self, run: JobRun, b: Baton) -> None:
        outcome = await self._watch_baton(run, b)
        if outcome in ("released", "superseded"):
            async with run.lock:
                if run.baton is b:
                    run.baton = None
                    if run.phase == "baton":
                        run.phase = "idle"
                    run.save_checkpoint()
            return
        self._record(run, "retry", b.proposed, detail={"failed_holder": b.successor, "why": outcome})
        async with run.lock:
            run.baton = None
            run.phase = "handing_off"
        if b.base is None:
            await self._handoff(run, None, b.model)
        else:
            await self._handoff(run, b.base, b.model)

    async def _ask_resume(self, run: JobRun, state: JobState) -> str:
        """"resume" when our predecessor confirms (or cannot be asked and nothing later is heard)."""
        pred = state.prev_holder
        if pred is not None and pred != self.me:
            deadline = time.monotonic() + RESUME_LISTEN_S * 2
            while time.monotonic() < deadline:
                if self.svc.table.is_live(pred):
                    try:
                        kind, f = await self._state_request(pred, ClaimRef.of(state).to_wire("resume_query"))
                        if kind == "verdict":
                            v = f.str("verdict", 16)
                            if v in ("resume", "superseded"):
                                return v
                            break
                    except Exception:  # noqa: BLE001
                        pass
                await trio.sleep(0.25)
        await trio.sleep(RESUME_LISTEN_S)  # listen to progress for a later claim
        if run.highest is not None and compare_claims(run.highest, state.claim) > 0 and \
                run.highest.lineage not in (state.lineage,):
            return "superseded"
        if run.completed is not None:
            return "superseded"
        return "resume"

    # ================================================================================ resume / fetch / views
    def _checkpoint_view(self, run: JobRun | None) -> dict[str, Any]:
        if run is None or run.completed is not None:
            return {"t": "checkpoint", "has": False}
        if run.phase == "baton" and run.baton is not None:
            b = run.baton
            src = b.base
            if src is None:
                return {"t": "checkpoint", "has": False}
            return {"t": "checkpoint", "has": True, "phase": "baton", "state": src.to_dict(), "model": b.model}
        if run.state is not None and run.phase in (*HOLDING, "superseded") and run.model:
            return {"t": "checkpoint", "has": True, "phase": run.phase, "state": run.state.to_dict(),
                    "model": run.model}
        return {"t": "checkpoint", "has": False}

    async def resume(self, job_id: str) -> dict[str, Any]:
        """`snakenode resume JOB`: restart from the highest committed hop any live node holds."""
        run = self.jobs.get(job_id)
        if run is None:
            raise ControlError(f"job {job_id} is not known on this node", "unknown_job")
        if run.completed is not None:
            raise ControlError(f"job {job_id} is already complete", "complete")
        offers: list[tuple[Claim, bool, str, dict[str, Any]]] = []
        mine = self._checkpoint_view(run)
        if mine["has"]:
            s = JobState.from_dict(mine["state"])
            offers.append((s.claim, s.finished, self.me, mine))
        for e in self.svc.table.live():
            if e.role != "node":
                continue
            try:
                kind, f = await self._state_request(e.peer_id, {"t": "checkpoint_query", "job_id": job_id})
            except Exception:  # noqa: BLE001
                continue
            if kind == "checkpoint" and f.bool("has", required=False):
                try:
                    s = JobState.from_dict(f.raw("state"))
                except (st.StateError, ValueError):
                    continue
                offers.append((s.claim, s.finished, e.peer_id, f.obj))
        if not offers:
            raise ControlError(f"no live node holds a checkpoint of job {job_id}", "no_checkpoint")
        # Highest claim first; at equal claims a finished (trained) hop is further along.
        best = offers[0]
        for o in offers[1:]:
            c = compare_claims(o[0], best[0])
            if c > 0 or (c == 0 and o[1] and not best[1]):
                best = o
        claim, _, holder, view = best
        if holder == self.me:
            result = await self.resume_local(job_id)
        else:
            kind, f = await self._state_request(holder, {"t": "resume_cmd", "job_id": job_id})
            result = dict(f.obj)
        return {"job_id": job_id, "holder": holder, "hop": claim.hop, "attempt": claim.attempt,
                "phase": view.get("phase"), "result": result.get("result", result.get("t"))}

    async def resume_local(self, job_id: str) -> dict[str, Any]:
        run = self.jobs.get(job_id)
        if run is None:
            return {"t": "error", "kind": "unknown_job", "error": "unknown job"}
        if run.completed is not None:
            self.counters.add("reject.state.job_complete")
            log.warning("resume_refused", job=job_id, reason="job_complete")
            return {"t": "error", "kind": "job_complete", "error": "the job is complete: nothing to resume"}
        if self.active is not None:
            return {"t": "error", "kind": "busy", "error": f"holding a hop of job {self.active}"}
        async with run.lock:
            if run.phase == "baton" and run.baton is not None and run.baton.base is not None:
                b = run.baton
                run.baton = None
                run.state, run.model, run.phase = b.base, dict(b.model), "handing_off"
                run.save_checkpoint()
            elif run.state is not None and run.model:
                if run.phase not in ("trained", "handing_off") or not run.state.finished:
                    run.phase = "received"
            else:
                return {"t": "error", "kind": "no_checkpoint", "error": "no checkpoint here"}
        await self._resume_holding(run)
        return {"t": "ok", "result": "resumed"}

    async def _serve_layers(self, io: host_mod.StreamIO, hashes: list[str]) -> None:
        have = [(h, self.store.size(h)) for h in hashes if self.store.has(h)]
        await io.write_frame({"t": "layers", "have": [{"hash": h, "size": n} for h, n in have]})
        for h, _size in have:
            with open(self.store.path(h), "rb") as fh:
                while chunk := fh.read(transfer.CHUNK):
                    await io.write(chunk)

    async def _pull_layers(self, run: JobRun, peer: str, wanted: dict[str, str]) -> int:
        """Fetch layers (name -> hash) from a peer into the store, verified against the schema."""
        io = await host_mod.open_stream(self.svc.host, peer, wire.PROTO_STATE, self.counters, "fetch")
        got = 0
        try:
            await io.write_frame({"t": "get_layers", "hashes": sorted(set(wanted.values()))})
            kind, f = await io.read_frame()
            if kind != "layers":
                raise ControlError(f"peer answered {kind!r} to get_layers", "fetch_failed")
            by_hash = {h: n for n, h in wanted.items()}
            for i, item in enumerate(f.raw("have")):
                g = wire.Fields(item, f"have[{i}]")
                h, size = g.str("hash", 64, pattern=wire.HEX64_RE), g.int("size")
                name = by_hash.get(h)
                if name is None or size != run.schema[name].size:
                    raise ControlError(f"peer offered an unexpected layer {h[:12]}", "fetch_failed")
                entry = bundle_mod.LayerEntry(name, h, size, run.schema[name].tensors)
                got += await transfer.receive_layers(
                    io, transfer.Incoming(bundle_mod.LayerBundle(run.job_id, {}, [entry]),
                                          [transfer.SendItem(entry, self.store.partial_offset(h))]),
                    run.schema, self.store) if not self.store.has(h) else 0
        finally:
            await io.close()
        return got

    async def fetch(self, job_id: str, out: str) -> dict[str, Any]:
        run = self.jobs.get(job_id)
        if run is None:
            raise ControlError(f"job {job_id} is not known on this node (`snakenode jobs` lists them)", "unknown_job")
        c = run.completed
        if c is None:
            raise ControlError(f"job {job_id} has not completed yet (`snakenode watch {job_id}` shows progress)",
                               "not_complete")
        if not run.schema:
            with trio.move_on_after(120):
                await self._prepare(run)
            if not run.schema:
                raise ControlError(f"cannot build job {job_id}'s model here: {run.error}", "fetch_failed")
        model: dict[str, str] = c["model"]
        missing = {n: h for n, h in model.items() if not self.store.has(h)}
        pulled = 0
        if missing:
            sources = [c["holder"]] + [e.peer_id for e in self.svc.table.live() if e.peer_id != c["holder"]]
            for peer in sources:
                if not self.svc.table.is_live(peer):
                    continue
                try:
                    pulled += await self._pull_layers(run, peer, missing)
                except Exception as exc:  # noqa: BLE001 - try the next source
                    log.warning("fetch_from_peer_failed", job=job_id, peer=peer, error=str(exc)[:200])
                missing = {n: h for n, h in missing.items() if not self.store.has(h)}
                if not missing:
                    break
            if missing:
                raise ControlError(f"layers {sorted(missing)[:4]} of the final model are on no live node",
                                   "fetch_failed")
        path = Path(out)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        layers = [(n, self.store.get_bytes(model[n])) for n in sorted(model)]
        meta = {"snakenode.job_id": job_id, "snakenode.model": str(run.spec["model"]),
                "snakenode.hop": str(c["hop"]), "snakenode.lineage": str(c["lineage"])}
        with open(tmp, "wb") as fh:
            bundle_mod.write_model_file(fh, layers, metadata=meta)
        os.replace(tmp, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"job_id": job_id, "path": str(path), "bytes": path.stat().st_size, "sha256": digest,
                "layers": model, "pulled_bytes": pulled, "hop": c["hop"], "holder": c["holder"],
                "test": c.get("test", {})}

    def jobs_view(self) -> list[dict[str, Any]]:
        return [self.job_summary(r) for r in sorted(self.jobs.values(), key=lambda r: r.signed.created)]

    def job_summary(self, run: JobRun) -> dict[str, Any]:
        recs = run.records()
        trained = [r for r in recs if r["event"] == "trained"]
        last = trained[-1] if trained else None
        s = run.state
        status = "complete" if run.completed else ("running" if recs else ("pending" if run.ready.is_set() else
                                                                           "preparing"))
        if run.error and not recs:
            status = "error"
        bytes_total = sum(r["bytes"]["bundle_out"] + r["bytes"]["negotiate"] for r in recs if r["node"])
        return {
            "job_id": run.job_id, "name": run.spec.get("name"), "model": run.spec["model"],
            "dataset": run.spec["dataset"], "mode": run.spec["mode"], "status": status,
            "joined": run.joined, "join_reason": run.join_reason, "phase": run.phase,
            "submitter": run.signed.submitter, "laps": run.spec["laps"], "blocks": run.blocks,
            "hop": None if last is None else last["hop"], "lap": None if last is None else last["lap"],
            "holder": None if last is None else last["holder"],
            "window": None if last is None else last["window"],
            "metrics": None if last is None else last["metrics_after"],
            "local_state": None if s is None else {"hop": s.hop, "attempt": s.attempt, "lap": s.lap},
            "completed": run.completed, "error": run.error or None, "records": len(recs),
            "bytes_total": bytes_total,
        }

    async def collect(self, run: JobRun) -> None:
        """Pull every live peer's own hop-log records of a job into seen.jsonl (watch, jobs, demo)."""
        async def pull(pid: str) -> None:
            try:
                kind, f = await self._state_request(pid, {"t": "get_records", "job_id": run.job_id})
            except Exception:  # noqa: BLE001 - a peer that cannot answer simply adds nothing
                return
            recs = f.raw("records", required=False, default=[]) if kind == "records" else []
            if not isinstance(recs, list):
                return
            for rec in recs[:100_000]:
                if not hoplog.validate_record(rec) and rec.get("node") == pid and rec.get("job_id") == run.job_id:
                    run.log_seen(rec)

        async with trio.open_nursery() as nursery:
            for e in self.svc.table.live():
                if e.role != "bootstrap":
                    nursery.start_soon(pull, e.peer_id)

    def job_detail(self, job_id: str, since: int = 0) -> dict[str, Any]:
        run = self.jobs.get(job_id)
        if run is None:
            matches = [j for j in self.jobs if j.startswith(job_id)] if job_id else []
            if len(matches) == 1:
                run = self.jobs[matches[0]]
            else:
                raise ControlError(f"job {job_id!r} is not known on this node (`snakenode jobs` lists them)",
                                   "unknown_job")
        recs = run.records()
        return {"summary": self.job_summary(run), "records": recs[since:], "total": len(recs),
                "spec": run.spec}
