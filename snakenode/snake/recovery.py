"""Carrying on after a restart, and `snakenode resume`: a node that held a hop (or a baton) when it stopped
asks its predecessor whether the hop is still its own and listens for later claims before resuming; a
resumed hop continues where its checkpoint left it (training again, or handing on the trained model).
`resume` finds the highest committed hop any live node holds and restarts the snake there.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.control import ControlError
from snakenode.snake import state as st
from snakenode.snake.context import NodeContext
from snakenode.snake.handoff import LEASE_TIMEOUT_S, Handoff
from snakenode.snake.holder import Holder
from snakenode.snake.journal import Journal
from snakenode.snake.messages import ClaimRef
from snakenode.snake.phases import HOLDING, BatonEnd, Phase, Verdict
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import HandlerTable, StateClient
from snakenode.snake.runtime import Baton, JobRun
from snakenode.snake.state import Claim, JobState, compare_claims

log = logs.get("snake")

RESUME_LISTEN_S = 4.0  # a restarted holder whose predecessor is unreachable listens this long for later claims
READY_WAIT_S = 60.0


def checkpoint_view(run: JobRun | None) -> dict[str, Any]:
    """What this node holds of a job that `resume` could restart from (`checkpoint` reply)."""
    if run is None or run.completed is not None:
        return {"t": "checkpoint", "has": False}
    if run.phase == Phase.BATON and run.baton is not None:
        b = run.baton
        src = b.base
        if src is None:
            return {"t": "checkpoint", "has": False}
        return {"t": "checkpoint", "has": True, "phase": str(run.phase), "state": src.to_dict(), "model": b.model}
    if run.state is not None and (run.phase in HOLDING or run.phase == Phase.SUPERSEDED) and run.model:
        return {"t": "checkpoint", "has": True, "phase": str(run.phase), "state": run.state.to_dict(),
                "model": run.model}
    return {"t": "checkpoint", "has": False}


class Recovery:
    def __init__(self, ctx: NodeContext, registry: JobRegistry, journal: Journal, holder: Holder,
                 handoff: Handoff, client: StateClient) -> None:
        self.ctx = ctx
        self.registry = registry
        self.journal = journal
        self.holder = holder
        self.handoff = handoff
        self.client = client
        self.counters = ctx.counters
        self.slot = ctx.slot

    def register(self, state_rpc: HandlerTable) -> None:
        state_rpc.register("checkpoint_query", self._on_checkpoint_query)
        state_rpc.register("resume_cmd", self._on_resume_cmd)

    async def _on_checkpoint_query(self, io: Any, f: wire.Fields) -> dict[str, Any]:
        return checkpoint_view(self.registry.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE)))

    async def _on_resume_cmd(self, io: Any, f: wire.Fields) -> dict[str, Any]:
        return await self.resume_local(f.str("job_id", 16, pattern=wire.JOB_ID_RE))

    # --- after a restart --------------------------------------------------------------------------
    async def recover(self, run: JobRun) -> None:
        """After a restart: resume what this node held, unless a later attempt or lineage superseded it."""
        if run.completed is not None or run.state is None:
            return
        with trio.move_on_after(READY_WAIT_S):
            await run.ready.wait()
        if run.phase == Phase.BATON and run.baton is not None:
            b = run.baton
            b.lease_deadline = time.monotonic() + LEASE_TIMEOUT_S
            log.info("baton_restored", job=run.job_id, hop=b.proposed.hop, successor=b.successor)
            await self._continue_handoff(run, b)
            return
        if run.phase not in HOLDING:
            return
        state = run.state
        verdict = await self._ask_resume(run, state)
        if verdict is not Verdict.RESUME:
            async with run.lock:
                run.phase = Phase.SUPERSEDED
                run.save_checkpoint()
            self.journal.record(run, "superseded", state, detail={"by": str(verdict), "why": "found at restart"})
            log.warning("superseded", job=run.job_id, hop=state.hop, why="found at restart", verdict=str(verdict))
            return
        await self._resume_holding(run)

    async def _resume_holding(self, run: JobRun) -> None:
        state = run.state
        if state is None:
            raise RuntimeError(f"job {run.job_id}: nothing to resume (run.state is None)")
        self.journal.record(run, "resumed", state, detail={"phase": str(run.phase)})
        log.info("resumed", job=run.job_id, hop=state.hop, phase=str(run.phase))
        self.slot.active = run.job_id
        if run.phase in (Phase.TRAINED, Phase.HANDING_OFF) and state.finished:
            self.ctx.tasks.start_soon(self._resume_handoff, run, state)
        else:
            run.phase = Phase.RECEIVED
            self.holder.start_holding(run)

    async def _resume_handoff(self, run: JobRun, base: JobState) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.holder.lease_loop, run, base)
                run.phase = Phase.HANDING_OFF
                if st.job_done(base, run.spec):
                    await self.holder.complete(run, base)
                else:
                    await self.holder.hand_on(run, base, dict(run.model))
                nursery.cancel_scope.cancel()
        finally:
            if self.slot.active == run.job_id:
                self.slot.active = None
            self.ctx.set_idle()

    async def _continue_handoff(self, run: JobRun, b: Baton) -> None:
        end = await self.handoff.watch_baton(run, b)
        if end in (BatonEnd.RELEASED, BatonEnd.SUPERSEDED):
            async with run.lock:
                if run.baton is b:
                    run.baton = None
                    if run.phase == Phase.BATON:
                        run.phase = Phase.IDLE
                    run.save_checkpoint()
            return
        self.journal.record(run, "retry", b.proposed, detail={"failed_holder": b.successor, "why": str(end)})
        async with run.lock:
            run.baton = None
            run.phase = Phase.HANDING_OFF
        await self.holder.hand_on(run, b.base, b.model)

    async def _ask_resume(self, run: JobRun, state: JobState) -> Verdict:
        """"resume" when our predecessor confirms (or cannot be asked and nothing later is heard)."""
        pred = state.prev_holder
        if pred is not None and pred != self.ctx.me:
            deadline = time.monotonic() + RESUME_LISTEN_S * 2
            while time.monotonic() < deadline:
                if self.ctx.svc.table.is_live(pred):
                    try:
                        kind, f = await self.client.request(pred, ClaimRef.of(state).to_wire("resume_query"))
                        if kind == "verdict":
                            v = f.str("verdict", 16)
                            if v in (Verdict.RESUME, Verdict.SUPERSEDED):
                                return Verdict(v)
                            break
                    except Exception:  # noqa: BLE001
                        pass
                await trio.sleep(0.25)
        await trio.sleep(RESUME_LISTEN_S)  # listen to progress for a later claim
        if run.highest is not None and compare_claims(run.highest, state.claim) > 0 and \
                run.highest.lineage not in (state.lineage,):
            return Verdict.SUPERSEDED
        if run.completed is not None:
            return Verdict.SUPERSEDED
        return Verdict.RESUME

    # --- `snakenode resume` -----------------------------------------------------------------------
    async def resume(self, job_id: str) -> dict[str, Any]:
        """`snakenode resume JOB`: restart from the highest committed hop any live node holds."""
        run = self.registry.jobs.get(job_id)
        if run is None:
            raise ControlError(f"job {job_id} is not known on this node", "unknown_job")
        if run.completed is not None:
            raise ControlError(f"job {job_id} is already complete", "complete")
        offers: list[tuple[Claim, bool, str, dict[str, Any]]] = []
        mine = checkpoint_view(run)
        if mine["has"]:
            s = JobState.from_dict(mine["state"])
            offers.append((s.claim, s.finished, self.ctx.me, mine))
        for e in self.ctx.svc.table.live():
            if e.role != "node":
                continue
            try:
                kind, f = await self.client.request(e.peer_id, {"t": "checkpoint_query", "job_id": job_id})
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
        if holder == self.ctx.me:
            result = await self.resume_local(job_id)
        else:
            kind, f = await self.client.request(holder, {"t": "resume_cmd", "job_id": job_id})
            result = dict(f.obj)
        return {"job_id": job_id, "holder": holder, "hop": claim.hop, "attempt": claim.attempt,
                "phase": view.get("phase"), "result": result.get("result", result.get("t"))}

    async def resume_local(self, job_id: str) -> dict[str, Any]:
        run = self.registry.jobs.get(job_id)
        if run is None:
            return {"t": "error", "kind": "unknown_job", "error": "unknown job"}
        if run.completed is not None:
            self.counters.add("reject.state.job_complete")
            log.warning("resume_refused", job=job_id, reason="job_complete")
            return {"t": "error", "kind": "job_complete", "error": "the job is complete: nothing to resume"}
        if self.slot.active is not None:
            return {"t": "error", "kind": "busy", "error": f"holding a hop of job {self.slot.active}"}
        async with run.lock:
            if run.phase == Phase.BATON and run.baton is not None and run.baton.base is not None:
                b = run.baton
                run.baton = None
                run.state, run.model, run.phase = b.base, dict(b.model), Phase.HANDING_OFF
                run.save_checkpoint()
            elif run.state is not None and run.model:
                if run.phase not in (Phase.TRAINED, Phase.HANDING_OFF) or not run.state.finished:
                    run.phase = Phase.RECEIVED
            else:
                return {"t": "error", "kind": "no_checkpoint", "error": "no checkpoint here"}
        await self._resume_holding(run)
        return {"t": "ok", "result": "resumed"}
