"""Holding a hop: train the window in the worker, then hand the snake on (snake/handoff.py) or, in CS mode,
back to the coordinator (snake/uplink.py); renew the baton lease with the predecessor meanwhile; give the
hop up when a later claim supersedes it; complete the job after its last hop. Also the predecessor's side
of the lease (`lease`, `release`, `resume_query` on /snake/state/1.0.0) and the completion announcements.

What differs between P2P and CS is asked of the job's mode policy (snake/modes.py).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.snake import custody as custody_mod
from snakenode.snake import state as st
from snakenode.snake.context import NodeContext
from snakenode.snake.handoff import LEASE_TIMEOUT_S, Handoff, Outcome
from snakenode.snake.job import metric_name
from snakenode.snake.journal import Journal
from snakenode.snake.messages import MAX_TAIL, ClaimRef, decode_links, decode_model_state
from snakenode.snake.modes import Modes
from snakenode.snake.phases import HOLDING, NodeState, Phase, Verdict
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import HandlerTable, StateClient
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import Claim, JobState, compare_claims
from snakenode.snake.uplink import Uplink
from snakenode.snake.view import NetworkView

log = logs.get("snake")

LEASE_RENEW_S = 1.0  # the successor renews its baton lease this often
JOIN_WAIT_S = 3.0  # the submitting node gives peers this long to hear of the job and say they join...
PREPARE_WAIT_S = 120.0  # ...and waits at most this long for those still building the model (torch start-up)
READY_WAIT_S = 600.0
COMPLETE_REPEATS_S = (0.0, 2.0, 6.0, 15.0)  # completion is re-announced: gossip is best effort


class Superseded(Exception):
    pass


class Holder:
    def __init__(self, ctx: NodeContext, registry: JobRegistry, journal: Journal, view: NetworkView,
                 handoff: Handoff, uplink: Uplink, modes: Modes, client: StateClient) -> None:
        self.ctx = ctx
        self.registry = registry
        self.journal = journal
        self.view = view
        self.handoff = handoff
        self.uplink = uplink
        self.modes = modes
        self.client = client
        self.counters = ctx.counters
        self.slot = ctx.slot

    def register(self, state_rpc: HandlerTable) -> None:
        for kind, fn in (("lease", self._on_lease), ("release", self._on_release),
                         ("resume_query", self._on_resume_query)):
            state_rpc.register(kind, self._claim_handler(fn))

    # --- holding ----------------------------------------------------------------------------------
    def start_holding(self, run: JobRun) -> None:
        """This node holds `run.state` now: mark the slot (before anything else can propose) and train it."""
        self.slot.active = run.job_id
        self.ctx.tasks.start_soon(self.hold, run)

    async def hold(self, run: JobRun) -> None:
        """Train this node's hop, then hand the snake on. Cancelled when the hop is superseded."""
        state = run.state
        if state is None:
            raise RuntimeError(f"job {run.job_id}: no hop to hold (run.state is None)")
        self.slot.active = run.job_id
        scope = trio.CancelScope()
        run.scope = scope
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.lease_loop, run, state)
                    await self._train_and_handoff(run, state)
                    nursery.cancel_scope.cancel()
        except Superseded as exc:
            log.info("hop_abandoned", job=run.job_id, hop=state.hop, why=str(exc))
        except Exception as exc:  # noqa: BLE001 - keep the node up; the predecessor's lease will lapse
            self.counters.add("error.hop")
            log.error("hop_failed", job=run.job_id, hop=state.hop, error=f"{type(exc).__name__}: {exc}"[:400])
            run.error = f"hop {state.hop}: {type(exc).__name__}: {exc}"
            if run.phase in HOLDING:
                run.phase = Phase.IDLE
        finally:
            if self.slot.active == run.job_id and (run.state is None or run.state.hop == state.hop
                                                   or run.phase not in HOLDING):
                self.slot.active = None
            self.ctx.set_idle()
        if scope.cancelled_caught:
            log.info("hop_cancelled", job=run.job_id, hop=state.hop)

    async def _train(self, run: JobRun, state: JobState, trained: dict[str, bool]) -> dict[str, Any]:
        w = run.spec["window"]

        run.last_metrics = {}  # the previous hop's progress must not show as this one's

        def on_event(name: str, data: dict[str, Any]) -> None:
            run.last_metrics = {"event": name, "hop": state.hop, "t": time.time(), **data}

        try:
            return await self.ctx.worker.call("train_hop", {
                "job": run.spec, "state": run.model, "window": [state.window.start, state.window.end],
                "train_stem": trained["stem"], "train_head": trained["head"], "data": self.ctx.data_spec.to_dict(),
                "reference_hist": self.view.reference_hist(run), "max_time_s": float(w["hop_time_s"]) * 3,
                "slowdown": self.ctx.cfg.compute_slowdown,
            }, on_event=on_event)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await self.ctx.worker.cancel()
            raise

    async def _train_and_handoff(self, run: JobRun, state: JobState) -> None:
        spec = run.spec
        w = spec["window"]
        svc = self.ctx.svc
        trained = {"stem": bool(w["train_stem"]), "head": bool(w["train_head"])}
        self.ctx.faults.check("train", hop=state.hop, attempt=state.attempt, job=run.job_id)
        run.phase = Phase.TRAINING
        svc.set_state(NodeState.TRAINING, run.job_id, state.hop)
        t_start = time.time()
        self.journal.record(run, "train_start", state, trained=trained, t_train_start=t_start)
        gossip_before = self.counters.total("bytes.gossip.")
        result = await self._train(run, state, trained)
        t_end = time.time()  # the worker stretches every step by `slowdown` (an emulated slower device)
        new_model = dict(result["state"])
        missing = [h for h in new_model.values() if not self.ctx.store.has(h)]
        if missing or set(new_model) != set(run.schema):
            raise RuntimeError(f"the worker returned an incomplete model ({len(missing)} layers missing)")
        metric = metric_name(spec)
        after = {k: float(v) for k, v in (result.get("metrics_after") or {}).items() if isinstance(v, int | float)}
        before = {k: float(v) for k, v in (result.get("metrics_before") or {}).items() if isinstance(v, int | float)}
        members = self.view.members(run)
        async with run.lock:
            self._check_current(run, state)
            base = st.finish_hop(state, metric=after.get(metric), members=members)
            run.state, run.model, run.phase = base, new_model, Phase.TRAINED
            run.save_checkpoint()
        self.journal.record(run, "trained", state, trained=trained, metrics_before=before, metrics_after=after,
                            t_train_start=t_start, t_train_end=t_end,
                            bytes={"gossip": self.counters.total("bytes.gossip.") - gossip_before},
                            detail={"kd": result.get("kd"), "samples_per_s": result.get("samples_per_s"),
                                    "peak_rss_mb": result.get("peak_rss_mb")})
        log.info("hop_trained", job=run.job_id, hop=state.hop, lap=state.lap, window=str(state.window),
                 metric=after.get(metric), seconds=round(t_end - t_start, 2))
        if base.lap > state.lap:
            self.journal.record(run, "lap_complete", base, detail={"metric": base.lap_metrics[-1]})
        done = st.job_done(base, spec)
        poisoned = await self.ctx.faults.at_handoff(new_model, self.ctx.store, hop=state.hop, attempt=state.attempt,
                                                    job=run.job_id)
        if poisoned is not None:
            new_model = run.model = poisoned
        if self.modes.of(run).hands_back(run):
            # CS mode: the trained window goes back to the coordinator, which plans the next hop.
            test = await self.final_test(run, new_model) if done else None
            run.phase = Phase.HANDING_OFF
            svc.set_state(NodeState.SENDING, run.job_id, state.hop)
            if await self.uplink.hand_back(run, base, new_model, test):
                async with run.lock:
                    if run.phase in HOLDING or run.phase == Phase.WAITING:
                        run.phase = Phase.IDLE
                    run.save_checkpoint()
                return
            # fallback = "p2p": the coordinator is gone; carry on as a P2P holder.
        if done:
            await self.complete(run, base)
            return
        run.phase = Phase.HANDING_OFF
        svc.set_state(NodeState.SENDING, run.job_id, state.hop)
        await self.hand_on(run, base, new_model)

    @staticmethod
    def _check_current(run: JobRun, state: JobState) -> None:
        if run.state is None or run.state.lineage != state.lineage or run.phase in (Phase.SUPERSEDED, Phase.DONE):
            raise Superseded(f"hop {state.hop} attempt {state.attempt} was superseded")

    async def hand_on(self, run: JobRun, base: JobState | None, model: dict[str, str]) -> None:
        """Hand the finished hop (or, with `base` None, the job's start) on, and act on how that ended."""
        res = await self.handoff.run(run, base, model)
        if res.outcome is Outcome.COMPLETE and res.base is not None:
            await self.complete(run, res.base)
        elif res.outcome is Outcome.SELF_HOP and res.base is not None:
            await self._self_hop(run, res.base, model, res.attempt)

    async def _self_hop(self, run: JobRun, base: JobState, model: dict[str, str], attempt: int) -> None:
        """The only member left in this lap: take the next hop here (no transfer)."""
        size = self.view.window_size(run, base.window) or int(run.spec["window"]["min_blocks"])
        async with run.lock:
            nxt = st.after_hop(base, self.ctx.me, min(size, run.blocks), spec=run.spec, attempt=attempt)
            self.journal.certify(run, nxt)
            run.state, run.model, run.phase = nxt, dict(model), Phase.RECEIVED
            run.observe(nxt.claim)
            run.save_checkpoint()
        self.journal.record(run, "received", nxt, t_recv=time.time(), detail={"self_hop": True})
        self.start_holding(run)  # before the current hop's task unwinds, so no proposal slips in

    async def originate(self, run: JobRun) -> None:
        """The submitting node starts the job: hop 0 here when it joined, else proposed to a member."""
        with trio.move_on_after(READY_WAIT_S):
            await run.ready.wait()
        if not run.ready.is_set():
            log.error("job_not_started", job=run.job_id, error=run.error or "model init did not finish")
            return
        # Give every peer time to hear of the job, then wait for those still building its model.
        await trio.sleep(JOIN_WAIT_S)
        deadline = time.monotonic() + PREPARE_WAIT_S
        while time.monotonic() < deadline and self.view.preparing(run):
            await trio.sleep(0.2)
        while not self.view.members(run):
            log.info("waiting_for_members", job=run.job_id)
            self.ctx.svc.set_state(NodeState.WAITING, run.job_id)
            await trio.sleep(1.0)
        members = self.view.members(run)
        async with run.lock:
            if run.state is not None or run.completed is not None:
                return
            if run.joined:
                size = self.view.window_size(run, None)
                if size is None:
                    size = int(run.spec["window"]["min_blocks"])
                state = st.start_job(run.job_id, members, self.ctx.me, min(size, run.blocks), run.blocks)
                self.journal.certify(run, state)
                run.state, run.model, run.phase = state, dict(run.init_state), Phase.RECEIVED
                run.observe(state.claim)
                run.save_checkpoint()
                self.journal.record(run, "received", state, t_recv=time.time())
                self.start_holding(run)
                return
        await self.hand_on(run, None, dict(run.init_state))

    # --- lease and supersession -------------------------------------------------------------------
    async def lease_loop(self, run: JobRun, state: JobState) -> None:
        """Renew the baton lease with our predecessor (the coordinator in CS mode) while we hold this hop."""
        pred = self.modes.of(run).lease_target(run, state)
        if pred is None or pred == self.ctx.me:
            return
        ref = ClaimRef.of(state)
        while run.state is not None and run.state.hop == state.hop and (run.phase in HOLDING
                                                                        or run.phase == Phase.WAITING):
            try:
                kind, f = await self.client.request(pred, ref.to_wire("lease", phase=str(run.phase)))
                if kind == "lease_revoked":
                    await self.supersede(run, state, f.str("by", 64, required=False) or "predecessor",
                                         f"predecessor revoked our lease: {f.str('reason', 200, required=False)}")
                    return
            except Exception:  # noqa: BLE001 - the predecessor may be gone; we carry on regardless
                self.counters.add("snake.lease.unreachable")
            await trio.sleep(LEASE_RENEW_S)

    async def supersede(self, run: JobRun, state: JobState, by: str, why: str) -> None:
        async with run.lock:
            if run.state is None or run.state.lineage != state.lineage or run.phase not in HOLDING:
                return
            run.phase = Phase.SUPERSEDED
            run.save_checkpoint()
        self.counters.add("snake.superseded")
        log.warning("superseded", job=run.job_id, hop=state.hop, attempt=state.attempt, by=by[:16], why=why)
        self.journal.record(run, "superseded", state, detail={"by": by, "why": why})
        if run.scope is not None:
            run.scope.cancel()

    def on_claim(self, run: JobRun, rec: dict[str, Any], claim: Claim) -> None:
        """A proven claim from the progress gossip (snake/journal.py): fence this node's baton and hop."""
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
            self.ctx.tasks.start_soon(self.supersede, run, s, rec["lineage"],
                                      f"{rec['event']} of hop {rec['hop']} attempt {rec['attempt']} wins")

    # --- the predecessor's side of the lease ------------------------------------------------------
    def _claim_handler(self, fn: Any) -> Any:
        async def handler(io: Any, f: wire.Fields) -> dict[str, Any]:
            ref = ClaimRef.from_wire(f)
            run = self.registry.jobs.get(ref.job_id)
            if run is None:
                return {"t": "unknown", "reason": "job unknown here"}
            reply: dict[str, Any] = await fn(run, ref, io.peer)
            return reply

        handler.__qualname__ = getattr(fn, "__qualname__", "claim_handler")
        return handler

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
                    return {"t": "verdict", "verdict": str(Verdict.SUPERSEDED), "by": ""}
                b.lease_deadline = time.monotonic() + LEASE_TIMEOUT_S
                return {"t": "verdict", "verdict": str(Verdict.RESUME)}
            if b is not None and b.proposed.hop == ref.hop and b.proposed.attempt > ref.attempt:
                return {"t": "verdict", "verdict": str(Verdict.SUPERSEDED), "by": b.proposed.lineage}
        if run.highest is not None and compare_claims(run.highest, Claim(0, ref.hop, ref.attempt, ref.lineage)) > 0 \
                and run.highest.hop >= ref.hop and run.highest.lineage != ref.lineage:
            return {"t": "verdict", "verdict": str(Verdict.UNKNOWN), "highest": run.highest.lineage}
        return {"t": "verdict", "verdict": str(Verdict.UNKNOWN)}

    # --- completion -------------------------------------------------------------------------------
    async def final_test(self, run: JobRun, model: dict[str, str]) -> dict[str, Any]:
        """The final model's metrics on the fixed test split (the same split on every node)."""
        try:
            result: dict[str, Any] = await self.ctx.worker.call(
                "evaluate", {"job": run.spec, "state": model, "data": self.ctx.data_spec.to_dict(), "split": "test"})
            return result
        except Exception as exc:  # noqa: BLE001 - completion must not hinge on the final evaluation
            log.warning("final_evaluation_failed", job=run.job_id, error=str(exc)[:200])
            return {}

    async def complete(self, run: JobRun, base: JobState, test: dict[str, Any] | None = None) -> None:
        if test is None:
            test = await self.final_test(run, run.model)
        reason = "laps" if base.lap >= run.spec["laps"] else "target"
        rec = {"t": "complete", "job_id": run.job_id, "hop": base.hop, "attempt": base.attempt, "lap": base.lap,
               "lineage": base.lineage, "holder": self.ctx.me, "model": run.model, "reason": reason,
               "test": {k: float(v) for k, v in test.items() if isinstance(v, int | float)},
               "lap_metrics": [m for m in base.lap_metrics if m is not None], "at": time.time()}
        async with run.lock:
            run.completed = rec
            run.phase = Phase.DONE
            run.save_meta()
            run.save_checkpoint()
        self.journal.record(run, "job_complete", base, detail={"reason": reason, "test": rec["test"]})
        log.info("job_complete", job=run.job_id, hops=base.hop + 1, laps=base.lap, reason=reason, test=rec["test"])
        self.registry.update_profile()
        if base.prev_holder and base.prev_holder != self.ctx.me and self.modes.of(run).releases_predecessor(run):
            await self.handoff.send_release(base)
        self.ctx.tasks.start_soon(self._announce_complete, rec)

    async def _announce_complete(self, rec: dict[str, Any]) -> None:
        last = 0.0
        for at in COMPLETE_REPEATS_S:
            await trio.sleep(at - last)
            last = at
            if self.ctx.svc.gossip is not None:
                run = self.registry.jobs.get(rec["job_id"])
                tail = [] if run is None else run.custody.chain(rec["lineage"], custody_mod.TAIL)
                await self.ctx.svc.gossip.publish("jobs", wire.packb({**rec, "custody": [x.to_wire() for x in tail]}))

    async def on_complete(self, sender: str, obj: dict[str, Any], refetch: bool = True) -> None:
        """A `complete` announcement on the jobs topic."""
        f = wire.Fields(obj, "jobs")
        job_id = f.str("job_id", 16, pattern=wire.JOB_ID_RE)
        run = self.registry.jobs.get(job_id)
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
                self.journal.gap_fill_later(run, sender, claim.lineage, self.on_complete, obj)
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
        self.registry.update_profile()
        if run.state is not None and run.phase in HOLDING and run.state.lineage != claim.lineage:
            self.ctx.tasks.start_soon(self.supersede, run, run.state, claim.lineage, "the job completed elsewhere")
