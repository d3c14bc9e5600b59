"""The jobs this node knows: which submitters it trusts, taking a verified job in (and joining it when the
local data matches), building its model in the worker, announcing it while it runs, and learning of jobs
it missed from the peers' profiles (`get_job`). Every job is checked against the trusted submitters
before anything else happens with it (snake/job.py).
"""

from __future__ import annotations

from typing import Any

import trio

from snakenode import logs, wire
from snakenode.control import ControlError
from snakenode.layers import bundle as bundle_mod
from snakenode.snake.context import NodeContext
from snakenode.snake.job import JobRejected, SignedJob, dataset_matches, verify_job
from snakenode.snake.rpc import HandlerTable, StateClient
from snakenode.snake.runtime import JobRun

log = logs.get("snake")

MAX_JOB_BYTES = 64 * 1024
REANNOUNCE_S = (1.0, 2.0)  # then every REANNOUNCE_EVERY_S while the job runs
REANNOUNCE_EVERY_S = 60.0


class JobRegistry:
    def __init__(self, ctx: NodeContext, client: StateClient) -> None:
        self.ctx = ctx
        self.client = client
        self.cfg = ctx.cfg
        self.counters = ctx.counters
        self.jobs: dict[str, JobRun] = {}
        self.extra_trusted: set[str] = set()
        self._rejected: set[str] = set()
        self._asking: set[str] = set()

    def register(self, state_rpc: HandlerTable) -> None:
        state_rpc.register("get_job", self._on_get_job)

    def trusted(self) -> set[str]:
        return {self.ctx.me, *self.cfg.trusted_submitters, *self.extra_trusted}

    def load(self) -> None:
        if not self.ctx.jobs_dir.exists():
            return
        for d in sorted(self.ctx.jobs_dir.iterdir()):
            if (d / "job.msgpack").exists():
                try:
                    run = JobRun.load(d)
                except (JobRejected, OSError) as exc:
                    log.warning("job_unreadable", dir=str(d), error=str(exc))
                    continue
                self.jobs[run.job_id] = run

    def resolve(self, job_id: str) -> JobRun:
        """A job by id or unique prefix; ControlError naming what to do otherwise."""
        run = self.jobs.get(job_id)
        if run is not None:
            return run
        matches = [j for j in self.jobs if j.startswith(job_id)] if job_id else []
        if len(matches) == 1:
            return self.jobs[matches[0]]
        if matches:
            raise ControlError(f"job id prefix {job_id!r} matches {len(matches)} jobs "
                               f"({', '.join(sorted(matches)[:4])}): give more of the id", "ambiguous")
        raise ControlError(f"job {job_id!r} is not known on this node (`snakenode jobs` lists them)", "unknown_job")

    # --- intake -----------------------------------------------------------------------------------
    def intake(self, signed: SignedJob, origin: bool = False) -> JobRun:
        """Record a verified job; join it when this node's data matches."""
        run = self.jobs.get(signed.job_id)
        if run is not None:
            return run
        run = JobRun.create(self.ctx.jobs_dir, signed)
        run.origin = origin
        spec = signed.spec
        if self.cfg.role != "node":
            run.joined, run.join_reason = False, f"role {self.cfg.role} does not train"
        elif self.ctx.data_spec is None:
            run.joined, run.join_reason = False, "no local data (start with --data)"
        elif not dataset_matches(spec["dataset"], self.cfg.data):
            run.joined, run.join_reason = False, f"local data {self.cfg.data!r} does not match {spec['dataset']!r}"
        else:
            run.joined, run.join_reason = True, "data matches"
        run.save_meta()
        self.jobs[run.job_id] = run
        self.update_profile()
        log.info("job_known", job=run.job_id, name=spec.get("name"), joined=run.joined, reason=run.join_reason,
                 submitter=signed.submitter)
        if run.joined or origin:
            self.ctx.tasks.start_if_running(self.prepare, run)
        return run

    def reject(self, job_id: str, exc: JobRejected) -> None:
        """Count and log a refused job once (gossip repeats it)."""
        if job_id in self._rejected:
            return
        self._rejected.add(job_id)
        self.counters.add(f"reject.job.{exc.reason}")
        log.warning("job_rejected", job=job_id, reason=exc.reason, detail=str(exc)[:200])

    async def prepare(self, run: JobRun) -> None:
        """Build the job's initial model in the worker (schema + deterministic initial layers)."""
        if run.ready.is_set():
            return
        store = self.ctx.store
        try:
            if not run.schema or not all(store.has(h) for h in run.init_state.values()):
                res = await self.ctx.worker.call("model_init", {"job": run.spec})
                run.schema = bundle_mod.schema_map(res["layers"])
                run.blocks = int(res["blocks"])
                run.init_state = dict(res["state"])
            if run.joined and run.capacity is None:
                run.capacity = await self.ctx.worker.call("capacity", {"job": run.spec,
                                                                       "data": self.ctx.data_spec.to_dict()})
            run.save_meta()
            run.ready.set()
            log.info("job_ready", job=run.job_id, blocks=run.blocks, layers=len(run.schema), joined=run.joined)
            self.update_profile()
        except Exception as exc:  # noqa: BLE001 - a job this node cannot build must not take it down
            run.error = f"{type(exc).__name__}: {exc}"
            self.counters.add("error.job_prepare")
            log.error("job_prepare_failed", job=run.job_id, error=run.error[:300])
            self.update_profile()

    def take_submission(self, raw: bytes) -> JobRun:
        """`snakenode submit` on this node: verify, refuse duplicates and CS jobs for another coordinator."""
        try:
            signed = SignedJob.decode(raw)
            verify_job(signed, self.trusted())
        except JobRejected as exc:
            self.counters.add(f"reject.job.{exc.reason}")
            raise ControlError(str(exc), exc.reason) from None
        if signed.job_id in self.jobs:
            raise ControlError(f"job {signed.job_id} is already known here", "duplicate")
        if signed.spec["mode"] == "cs" and signed.spec.get("coordinator") != self.ctx.me:
            raise ControlError(f"a CS job is submitted on its coordinator ({signed.spec.get('coordinator')}), "
                               f"not here: run `snakenode submit ... --mode cs --home COORDINATOR_HOME`",
                               "not_coordinator")
        return self.intake(signed, origin=True)

    # --- announcing -------------------------------------------------------------------------------
    async def announce(self, raw: bytes) -> None:
        if self.ctx.svc.gossip is None:
            raise RuntimeError("the node's gossip is not running: jobs are submitted to a started node")
        await self.ctx.svc.gossip.publish("jobs", wire.packb({"t": "job", "job": raw}))

    async def reannounce(self, run: JobRun, raw: bytes) -> None:
        """Late joiners learn of the job: re-announce while it runs (gossip is best effort)."""
        delays = list(REANNOUNCE_S)  # late joiners also learn of the job from the peers' profiles (get_job)
        while run.completed is None:
            await trio.sleep(delays.pop(0) if delays else REANNOUNCE_EVERY_S)
            if run.completed is None and self.ctx.svc.gossip is not None:
                await self.ctx.svc.gossip.publish("jobs", wire.packb({"t": "job", "job": raw}))

    async def on_job_msg(self, sender: str, f: wire.Fields) -> None:
        """A `job` announcement on the jobs topic."""
        raw = f.bytes("job", MAX_JOB_BYTES)
        try:
            signed = SignedJob.decode(raw)
        except JobRejected as exc:
            raise wire.WireError(str(exc), "bad_job") from None
        if signed.job_id in self.jobs:
            return
        try:
            verify_job(signed, self.trusted())
        except JobRejected as exc:
            self.reject(signed.job_id, exc)
            return
        self.intake(signed)

    def on_peer_profile(self, prof: dict[str, Any]) -> None:
        """A peer works on jobs we never heard of (we joined late): ask it for them at once."""
        for job_id in [*(prof.get("jobs") or []), *(prof.get("preparing") or [])]:
            if job_id not in self.jobs and job_id not in self._rejected and job_id not in self._asking \
                    and self.ctx.tasks.running:
                self._asking.add(job_id)
                self.ctx.tasks.start_soon(self._ask_job, prof["peer_id"], job_id)

    async def _ask_job(self, peer: str, job_id: str) -> None:
        try:
            kind, f = await self.client.request(peer, {"t": "get_job", "job_id": job_id})
            if kind != "job":
                return
            signed = SignedJob.decode(f.bytes("job", MAX_JOB_BYTES))
            if signed.job_id != job_id:
                raise wire.WireError("the peer sent another job than asked", "forged")
            verify_job(signed, self.trusted())
            self.intake(signed)
        except JobRejected as exc:
            self._rejected.add(job_id)
            self.counters.add(f"reject.job.{exc.reason}")
            log.warning("job_rejected", job=job_id, reason=exc.reason, detail=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - the periodic re-announcement is the fallback
            self.counters.add("snake.get_job.failed")
            log.debug("get_job_failed", job=job_id, peer=peer, error=f"{type(exc).__name__}: {exc}"[:200])
        finally:
            self._asking.discard(job_id)

    async def _on_get_job(self, io: Any, f: wire.Fields) -> dict[str, Any]:
        run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
        if run is None:
            return {"t": "unknown", "reason": "job unknown here"}
        return {"t": "job", "job": run.signed.encode()}

    # --- what this node advertises and keeps --------------------------------------------------------
    def update_profile(self) -> None:
        svc = self.ctx.svc
        ids = sorted(j.job_id for j in self.jobs.values()
                     if j.joined and j.ready.is_set() and j.completed is None)
        preparing = sorted(j.job_id for j in self.jobs.values()
                           if j.joined and not j.ready.is_set() and not j.error and j.completed is None)
        if svc.profile_fields.get("jobs") != ids or svc.profile_fields.get("preparing") != preparing:
            svc.profile_fields["jobs"] = ids
            svc.profile_fields["preparing"] = preparing
            svc.profile_changed()

    def gc(self) -> None:
        """Drop layers no job references any more from the store."""
        keep: set[str] = set()
        for r in self.jobs.values():
            keep |= r.referenced_hashes()
        removed = self.ctx.store.gc(keep)
        if removed:
            log.debug("store_gc", removed=removed)
