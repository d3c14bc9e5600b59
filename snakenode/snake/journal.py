"""The journal of the snake: this node's hop records, the progress gossip that spreads the ones every node
needs, and the chain of custody behind them (signing hand-overs, fetching a chain's missing part, filling
gaps in the background). A progress record from a peer counts only once its lineage is proven back to the
job's genesis (snake/custody.py); what it claims is then passed to the `on_claim` hook (the holder's
fencing: drop a released baton, give up a superseded hop).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.snake import custody as custody_mod
from snakenode.snake import hoplog
from snakenode.snake import state as st
from snakenode.snake.context import NodeContext
from snakenode.snake.messages import decode_links
from snakenode.snake.rpc import HandlerTable, StateClient
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import Claim, JobState

log = logs.get("snake")

# Hop-log events every node needs (fencing, supersession, completion, the per-hop metric). The rest stay in
# the writer's own log; `job` with collect=true pulls them from the peers for watch, jobs and the demo.
GOSSIPED_EVENTS = ("received", "trained", "retry", "reassigned", "superseded", "resumed", "job_complete",
                   "lap_complete")
MAX_PENDING_GAPS = 64
SERVED_RECORDS = 20_000

# A message handler that a gap fill re-runs once the chain is known: (sender, message, refetch=False).
Refetchable = Callable[..., Awaitable[None]]
ClaimHook = Callable[[JobRun, dict[str, Any], Claim], None]


def own_records(run: JobRun) -> list[dict[str, Any]]:
    return hoplog.read_log(run.hoplog_path) if run.hoplog_path.exists() else []


class Journal:
    def __init__(self, ctx: NodeContext, client: StateClient, jobs: dict[str, JobRun]) -> None:
        self.ctx = ctx
        self.client = client
        self.jobs = jobs
        self.counters = ctx.counters
        self.on_claim: ClaimHook = lambda run, rec, claim: None
        self._custody_pending: set[tuple[str, str]] = set()  # (job, lineage) chains being fetched

    def register(self, state_rpc: HandlerTable) -> None:
        state_rpc.register("get_records", self._on_get_records)
        state_rpc.register("get_custody", self._on_get_custody)

    # --- records ----------------------------------------------------------------------------------
    def record(self, run: JobRun, event: str, state: JobState, **fields: Any) -> dict[str, Any]:
        rec = hoplog.from_state(event, state, node=self.ctx.me, t=time.time(), **fields)
        run.log(rec)
        if event in GOSSIPED_EVENTS:
            msg: dict[str, Any] = {"t": "progress", "rec": rec}
            link = run.custody.links.get(state.lineage)
            if link is not None:
                msg["cust"] = [link.signer, link.sig]  # the rest of the link is in the record
            self.ctx.tasks.start_if_running(self._publish, "progress", msg)
        return rec

    async def _publish(self, topic: str, msg: dict[str, Any]) -> None:
        if self.ctx.svc.gossip is not None:
            await self.ctx.svc.gossip.publish(topic, wire.packb(msg))

    async def collect(self, run: JobRun) -> None:
        """Pull every live peer's own hop-log records of a job into seen.jsonl (watch, jobs, demo)."""
        async def pull(pid: str) -> None:
            try:
                kind, f = await self.client.request(pid, {"t": "get_records", "job_id": run.job_id})
            except Exception:  # noqa: BLE001 - a peer that cannot answer simply adds nothing
                return
            recs = f.raw("records", required=False, default=[]) if kind == "records" else []
            if not isinstance(recs, list):
                return
            for rec in recs[:100_000]:
                if not hoplog.validate_record(rec) and rec.get("node") == pid and rec.get("job_id") == run.job_id:
                    run.log_seen(rec)

        async with trio.open_nursery() as nursery:
            for e in self.ctx.svc.table.live():
                if e.role != "bootstrap":
                    nursery.start_soon(pull, e.peer_id)

    async def _on_get_records(self, io: Any, f: wire.Fields) -> dict[str, Any]:
        run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
        own = own_records(run) if run is not None else []
        return {"t": "records", "records": own[-SERVED_RECORDS:]}

    # --- chain of custody -------------------------------------------------------------------------
    def certify(self, run: JobRun, state: JobState) -> None:
        """Sign the hand-over of `state` (this node holds its parent, submitted the job, or coordinates it)."""
        if state.lineage in run.custody.links:
            return
        link = custody_mod.sign(self.ctx.ident, state.parent_lineage, state.hop, state.attempt, state.holder)
        problem, missing = run.add_custody([link])
        if problem or missing:
            self.counters.add("error.custody.sign")
            log.error("custody_sign_failed", job=run.job_id, hop=state.hop, problem=problem,
                      missing=(missing or "")[:16], hint="this node cannot prove it held the hop before: "
                      "its successor will decline the proposal with `custody`")

    async def _fetch_custody(self, run: JobRun, peer: str, lineage: str) -> list[custody_mod.Link]:
        self.counters.add("custody.fetch")
        kind, f = await self.client.request(peer, {"t": "get_custody", "job_id": run.job_id, "lineage": lineage})
        if kind != "custody":
            raise wire.WireError(f"{peer} has no chain of custody for lineage {lineage[:16]}", "custody")
        return decode_links(f, "links", custody_mod.MAX_CHAIN)

    async def accept_custody(self, run: JobRun, peer: str, links: list[custody_mod.Link], lineage: str,
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

    async def _on_get_custody(self, io: Any, f: wire.Fields) -> dict[str, Any]:
        run = self.jobs.get(f.str("job_id", 16, pattern=wire.JOB_ID_RE))
        lineage = f.str("lineage", 64, pattern=wire.HEX64_RE)
        chain = [] if run is None else run.custody.chain(lineage)
        if run is None or not chain or chain[0].parent != run.custody.genesis:
            return {"t": "unknown", "reason": "no chain of custody for that lineage here"}
        return {"t": "custody", "links": [link.to_wire() for link in chain]}

    def gap_fill_later(self, run: JobRun, sender: str, lineage: str, handler: Refetchable,
                       obj: dict[str, Any]) -> None:
        """A claim whose chain of custody has a gap here (a late joiner, lost gossip, a healed partition):
        fetch the chain from its author in the background, then handle the message again (once)."""
        key = (run.job_id, lineage)
        if key in self._custody_pending or len(self._custody_pending) >= MAX_PENDING_GAPS \
                or not self.ctx.tasks.running:
            self.counters.add("custody.fetch_skipped")
            return
        self._custody_pending.add(key)

        async def fill() -> None:
            try:
                why = await self.accept_custody(run, sender, [], lineage)
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

        self.ctx.tasks.start_soon(fill)

    # --- progress gossip --------------------------------------------------------------------------
    async def on_progress_msg(self, sender: str, obj: dict[str, Any], refetch: bool = True) -> None:
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
                self.gap_fill_later(run, sender, rec["lineage"], self.on_progress_msg, obj)
            return
        run.log_seen(rec)
        if rec["event"] in ("proposed", "declined", "accepted"):
            return  # proposals are not claims until committed
        claim = Claim(rec["lap"], rec["hop"], rec["attempt"], rec["lineage"])
        run.observe(claim)
        self.on_claim(run, rec, claim)
