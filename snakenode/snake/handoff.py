"""Handing a finished hop on: rank the candidates, propose (Propose -> Accept | Decline), transfer the
layers the successor lacks, keep the baton while the successor renews its lease, and retry the hop as the
next attempt elsewhere when the successor is lost. What to do after each answer is snake/retry.py's pure
policy; this module is the I/O around it. It returns an outcome to the holder (snake/holder.py) instead
of calling back into it: released, superseded, stopped, or one of the two ends the holder acts on itself
(the job is complete; this node is the lap's last member and takes the next hop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.net import transfer
from snakenode.snake import custody as custody_mod
from snakenode.snake import retry, routing
from snakenode.snake import state as st
from snakenode.snake.context import NodeContext
from snakenode.snake.journal import Journal
from snakenode.snake.messages import Accept, ClaimRef, Decline, Propose
from snakenode.snake.modes import Modes
from snakenode.snake.phases import BatonEnd, NodeState, Phase
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import StateClient
from snakenode.snake.runtime import Baton, JobRun
from snakenode.snake.sender import Sender
from snakenode.snake.state import JobState, compare_claims
from snakenode.snake.view import NetworkView

log = logs.get("snake")

LEASE_TIMEOUT_S = 6.0  # the predecessor retries the hop when its successor has not renewed for this long
DISCONNECT_GRACE_S = 1.0  # a successor gone from the peer table this long counts as lost
PROPOSE_TIMEOUT_S = 10.0
WAIT_TICK_S = 0.5  # when no candidate is eligible, look again this often
BATON_POLL_S = 0.25


class Outcome(StrEnum):
    RELEASED = "released"  # the successor handed on (or the job completed): the baton is dropped
    SUPERSEDED = "superseded"  # a later claim won
    STOPPED = "stopped"  # the job completed elsewhere, or this hop was superseded, before a hand-off
    COMPLETE = "complete"  # drops closed the job's last lap: the holder completes the job here
    SELF_HOP = "self_hop"  # this node is the lap's last member: the holder takes the next hop itself


@dataclass
class Result:
    outcome: Outcome
    base: JobState | None = None  # COMPLETE and SELF_HOP: the state to act on
    attempt: int = 0  # SELF_HOP: the attempt number of the next hop


@dataclass
class Delivery:
    """How a transfer ended: `ok` (committed), a failure worth retrying, or the receiver's poisoning guard
    refused the model (`poison`)."""

    ok: bool
    poison: bool = False
    bytes: int = 0
    path: dict[str, Any] | None = None


class Handoff:
    def __init__(self, ctx: NodeContext, view: NetworkView, journal: Journal, sender: Sender, modes: Modes,
                 client: StateClient, registry: JobRegistry) -> None:
        self.ctx = ctx
        self.view = view
        self.journal = journal
        self.sender = sender
        self.modes = modes
        self.client = client
        self.registry = registry
        self.counters = ctx.counters

    async def run(self, run: JobRun, base: JobState | None, model: dict[str, str]) -> Result:
        """Propose, transfer, keep the baton; retry as the next attempt until a successor hands on."""
        me = self.ctx.me
        spec = run.spec
        record = self.journal.record
        suggested = min(int(spec["window"]["max_blocks"]), run.blocks)
        tries = retry.Tries()
        blocked_since: dict[str, float] = {}
        lap_seen = None if base is None else base.lap
        start_members = self.view.members(run) - ({me} if not run.joined else set())
        while True:
            rival = (base is not None and run.highest is not None and compare_claims(run.highest, base.claim) > 0
                     and not run.descends(run.highest.lineage, base.lineage))
            halt = retry.halt(finished=run.completed is not None or run.phase == Phase.SUPERSEDED, rival_ahead=rival)
            if halt is retry.Next.STOP:
                return Result(Outcome.STOPPED)
            if halt is retry.Next.SUPERSEDED and base is not None and run.highest is not None:
                # A rival lineage is ahead (a zombie successor carried on, or a healed partition): stop.
                run.phase = Phase.SUPERSEDED
                run.save_checkpoint()
                self.counters.add("snake.superseded")
                record(run, "superseded", base, detail={"by": run.highest.lineage,
                                                        "why": "a later claim of another lineage"})
                log.warning("superseded", job=run.job_id, hop=base.hop, by=run.highest.lineage[:16])
                return Result(Outcome.SUPERSEDED)
            members = self.view.members(run)
            if base is not None:
                async with run.lock:
                    before = set(base.dropped)
                    base = st.drop_down(base, self.view.down_for(base), spec=spec, members=members or {me})
                    run.state = base
                for peer in sorted(set(base.dropped) - before):
                    record(run, "dropped", base, detail={"peer": peer, "reason": "down"})
                    log.info("member_dropped", job=run.job_id, peer=peer, why="down")
                if self._lap_closed_by_drops(run, base, lap_seen) and st.job_done(base, spec):
                    return Result(Outcome.COMPLETE, base)
                lap_seen = base.lap
                ranking = self.view.rank(run, base, dict(tries.excluded))
            else:
                # Hop 0 proposed by a submitter that does not train: rank the members as if this node had
                # just finished a hop of a lap they all still have to visit.
                pool = (start_members or members) | {me}
                provisional = st.start_job(run.job_id, pool, me, 1, run.blocks)
                ranking = self.view.rank(run, st.finish_hop(provisional, metric=None, members=pool), dict(tries.excluded))
            step = retry.route([c.peer_id for c in ranking.choices],
                               lap_remaining=None if base is None else st.lap_remaining(base), me=me)
            if step is retry.Next.SELF_HOP and base is not None:
                # This lap has no other member (alone, or the others were dropped): train here.
                return Result(Outcome.SELF_HOP, base, run.next_attempt(base.hop + 1, tries.attempt))
            if step is not retry.Next.PROPOSE:
                if base is not None:
                    base = await self._drop_blocked(run, base, ranking, blocked_since, members)
                    if not st.lap_remaining(base) and base.finished:
                        continue  # the drops closed the lap: rank again for the next one
                tries = retry.waited(tries, WAIT_TICK_S)
                self.ctx.svc.set_state(NodeState.WAITING, run.job_id, None if base is None else base.hop)
                await trio.sleep(WAIT_TICK_S)
                continue
            cand = ranking.choices[0].peer_id
            tries = retry.proposing(tries, run.next_attempt(0 if base is None else base.hop + 1, tries.attempt))
            if base is None:
                proposal = st.start_job(run.job_id, (start_members or members) | {cand}, cand,
                                        min(suggested, run.blocks), run.blocks, attempt=tries.attempt)
            else:
                proposal = st.after_hop(base, cand, suggested, spec=spec, attempt=tries.attempt)
            self.journal.certify(run, proposal)
            record(run, "proposed", proposal, detail={"score": ranking.choices[0].score,
                                                      "reasons": ranking.choices[0].reasons})
            # The fast bulk lane (docs/PROTOCOL.md): offered when the whole model reaches the threshold; used
            # when the Accept carries an offer and the bytes actually planned reach it too.
            cert = self.sender.lane_cert(run, model)
            reply, negotiate_bytes, via = await self.propose(run, cand, proposal, model, cert)
            if not isinstance(reply, Accept):
                reason = None if reply is None else reply.reason
                record(run, "declined", proposal, bytes={"negotiate": negotiate_bytes},
                       detail={"reason": "timeout" if reply is None else reply.reason, "detail": "" if reply is None else reply.detail})
                tries = retry.declined(tries, cand, reason)
                if base is not None:
                    async with run.lock:
                        before = set(base.dropped)
                        base = st.record_decline(base, cand, spec=spec, members=members or {me})
                        run.state = base
                    for peer in set(base.dropped) - before:
                        record(run, "dropped", base, detail={"peer": peer, "reason": "declines"})
                continue
            if base is None:
                proposal = st.start_job(run.job_id, proposal.lap_members, cand, reply.size, run.blocks,
                                        attempt=proposal.attempt)
            else:
                proposal = st.resize(proposal, reply.size)
            items = self.sender.plan(run, model, reply.held, reply.partial)
            record(run, "accepted", proposal, bytes={"negotiate": negotiate_bytes}, detail={
                "planned_bytes": sum(it.entry.size - it.offset for it in items), "layers": len(items),
                "held": len(reply.held), "resumed_bytes": sum(it.offset for it in items)})
            offer = reply.lane if cert is not None else None
            sent = await self.transfer(run, cand, proposal, model, items, offer, cert, via)
            if sent.poison:
                # The receiver's poisoning guard refused the model: a Decline(poison_suspect); route on.
                record(run, "declined", proposal, detail={"reason": "poison_suspect"})
                tries = retry.poison_refused(tries, cand, proposal.attempt)
                continue
            if not sent.ok:
                tries = retry.transfer_failed(tries, cand, proposal.attempt)
                self.counters.add("snake.retry.transfer")
                record(run, "retry", proposal, detail={"failed_holder": cand, "why": "transfer"})
                continue
            record(run, "handoff", proposal, bytes={"bundle_out": sent.bytes, "negotiate": negotiate_bytes},
                   t_handoff=time.time(), detail=sent.path)
            record(run, "committed", proposal)
            if proposal.attempt > 0:
                record(run, "reassigned", proposal, detail={"new_holder": cand})
            baton = Baton(base, proposal, cand, dict(model), lease_deadline=time.monotonic() + LEASE_TIMEOUT_S)
            async with run.lock:
                run.baton = baton
                run.phase = Phase.BATON
                run.save_checkpoint()
            if self.ctx.slot.active == run.job_id:
                self.ctx.slot.active = None
            self.ctx.set_idle()
            if base is not None and base.prev_holder and base.prev_holder != me \
                    and self.modes.of(run).releases_predecessor(run):
                await self.send_release(base)
            end = await self.watch_baton(run, baton)
            if end is BatonEnd.RELEASED:
                record(run, "released", proposal)
                async with run.lock:
                    if run.baton is baton:
                        run.baton = None
                    if run.phase == Phase.BATON:
                        run.phase = Phase.IDLE
                    run.save_checkpoint()
                self.registry.gc()
                return Result(Outcome.RELEASED)
            if end is BatonEnd.SUPERSEDED:
                return Result(Outcome.SUPERSEDED)
            # The successor is lost: retry this hop as the next attempt, elsewhere.
            tries = retry.successor_lost(tries, cand, proposal.attempt)
            self.counters.add(f"snake.retry.{end}")
            log.warning("successor_lost", job=run.job_id, hop=proposal.hop, attempt=proposal.attempt,
                        successor=cand, why=str(end))
            record(run, "retry", proposal, detail={"failed_holder": cand, "why": str(end)})
            run.phase = Phase.HANDING_OFF

    def _lap_closed_by_drops(self, run: JobRun, base: JobState, lap_seen: int | None) -> bool:
        """Drops (down, declines, blocked) can close a lap without a hop: log it. True when they did."""
        if lap_seen is None or base.lap <= lap_seen:
            return False
        self.journal.record(run, "lap_complete", base, detail={"metric": base.lap_metrics[-1], "closed_by": "drops"})
        return True

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
                    base = st.drop_member(base, ex.peer_id, "declines", members=members or {self.ctx.me})
                    run.state = base
                blocked_since.pop(ex.peer_id, None)
                self.counters.add("snake.dropped.blocked")
                self.journal.record(run, "dropped", base, detail={"peer": ex.peer_id, "reason": "declines",
                                                                  "why": ex.reason})
                log.info("member_dropped", job=run.job_id, peer=ex.peer_id, why=ex.reason)
        return base

    async def propose(self, run: JobRun, cand: str, proposal: JobState, model: dict[str, str],
                      lane_cert: lane_mod.LaneCert | None = None) -> tuple[Accept | Decline | None, int, str | None]:
        """(reply, negotiate bytes, the IP address of the connection the negotiation ran on). A coordinator
        sends the same message as `assign` on /snake/cs/1.0.0."""
        assign = self.modes.of(run).assigns(run)
        self.ctx.faults.check("assign" if assign else "propose", hop=proposal.hop, attempt=proposal.attempt,
                              job=run.job_id)
        msg = Propose(run.job_id, run.signed.encode(), proposal, proposal.window.size, model,
                      None if lane_cert is None else lane_cert.der,
                      run.custody.chain(proposal.lineage, custody_mod.TAIL))
        io = None
        try:
            with trio.fail_after(PROPOSE_TIMEOUT_S):
                io = await host_mod.open_stream(self.ctx.svc.host, cand,
                                                wire.PROTO_CS if assign else wire.PROTO_NEGOTIATE,
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
        except Exception as exc:  # noqa: BLE001 - any failure (timeout, wire, connection): next candidate
            self.counters.add("snake.propose.failed")
            log.info("propose_failed", job=run.job_id, hop=proposal.hop, peer=cand,
                     error=f"{type(exc).__name__}: {exc}"[:200])
            return None, 0 if io is None else io.bytes_in + io.bytes_out, None
        finally:
            if io is not None:
                await io.close()

    async def transfer(self, run: JobRun, cand: str, proposal: JobState, model: dict[str, str],
                       items: list[transfer.SendItem], offer: lane_mod.LaneOffer | None = None,
                       cert: lane_mod.LaneCert | None = None, via: str | None = None) -> Delivery:
        """Send the accepted hop's bundle on a new /snake/bundle/1.0.0 stream (or the lane, snake/sender.py)."""
        manifest = bundle_mod.LayerBundle(run.job_id, proposal.to_dict(), self.sender.entries(run, model))
        self.ctx.svc.set_state(NodeState.SENDING, run.job_id, proposal.hop - 1 if proposal.hop else None)
        lane = offer is not None and cert is not None

        async def bundle_stream() -> host_mod.StreamIO:
            return await host_mod.open_stream(self.ctx.svc.host, cand, wire.PROTO_BUNDLE, self.counters, "bundle")

        try:
            sent = await self.sender.send(run, cand, manifest, items, stream=bundle_stream, owns_stream=True,
                                          offer=offer, cert=cert, via=via, ctx={"hop": proposal.hop, "job": run.job_id})
        except transfer.TransferError as exc:
            self.counters.add("snake.transfer.failed")
            log.warning("bundle_failed", job=run.job_id, hop=proposal.hop, to=cand, kind=exc.kind, lane=lane,
                        error=str(exc)[:300])
            return Delivery(False, poison=exc.kind == "poison_suspect")
        except Exception as exc:  # noqa: BLE001 - any failure: re-propose (resumes) or move on
            self.counters.add("snake.transfer.failed")
            log.warning("bundle_failed", job=run.job_id, hop=proposal.hop, to=cand, lane=lane,
                        error=f"{type(exc).__name__}: {exc}"[:300])
            return Delivery(False)
        log.info("bundle_sent", job=run.job_id, hop=proposal.hop, to=cand, layers=len(items),
                 bytes=sent.bytes, seconds=round(sent.seconds, 3), **sent.path)
        return Delivery(True, bytes=sent.bytes, path=sent.path)

    async def watch_baton(self, run: JobRun, baton: Baton) -> BatonEnd:
        """Wait until the successor releases the baton, or is lost (its lease lapsed, or it disconnected)."""
        gone_at: float | None = None
        while True:
            if baton.released or run.completed is not None:
                return BatonEnd.RELEASED
            if run.phase == Phase.SUPERSEDED:
                return BatonEnd.SUPERSEDED
            now = time.monotonic()
            lost: BatonEnd | None = None
            if not self.ctx.svc.table.is_live(baton.successor):
                gone_at = gone_at or now
                if now - gone_at >= DISCONNECT_GRACE_S:
                    lost = BatonEnd.DISCONNECT
            else:
                gone_at = None
            if lost is None and now > baton.lease_deadline:
                lost = BatonEnd.LEASE
            if lost is not None:
                async with run.lock:
                    if not baton.released:
                        baton.retrying = True
                        return lost
                    return BatonEnd.RELEASED
            with trio.move_on_after(BATON_POLL_S):
                await baton.event.wait()

    async def send_release(self, state: JobState) -> None:
        """Tell our predecessor to drop its baton: we handed on (or completed)."""
        if state.prev_holder is None:
            return
        try:
            await self.client.request(state.prev_holder, ClaimRef.of(state).to_wire("release"))
        except Exception:  # noqa: BLE001 - a gone predecessor has nothing left to release
            self.counters.add("snake.release.unreachable")
