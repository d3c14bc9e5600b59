"""The receiving side of a hand-off: answering a proposal (P2P `propose`, or a CS `assign` from the
coordinator) with Accept or Decline, the reservation an Accept makes, and taking the bundle in (over
libp2p or the fast bulk lane: the same checks either way), with the poisoning guard (snake/guard.py)
before the hop is taken. A received hop is handed to the `on_received` hook (the holder trains it).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.net import transfer
from snakenode.snake import guard
from snakenode.snake import state as st
from snakenode.snake.context import RESERVATION_S, NodeContext, Reservation
from snakenode.snake.handoff import PROPOSE_TIMEOUT_S
from snakenode.snake.job import JobRejected, SignedJob, verify_job
from snakenode.snake.journal import Journal
from snakenode.snake.messages import Accept, Decline, Propose
from snakenode.snake.modes import Modes
from snakenode.snake.phases import NodeState, Phase
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import HandlerTable
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import JobState, compare_claims
from snakenode.snake.view import NetworkView

log = logs.get("snake")

NEGOTIATE_FRAME_LIMIT = 2 * 2**20
BUNDLE_FRAME_LIMIT = bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024
REAP_EVERY_S = 1.0

Evaluate = Callable[[JobRun, dict[str, str]], Awaitable[dict[str, Any]]]


async def poison_check(store: LayerStore, evaluate: Evaluate | None, run: JobRun, state: JobState,
                       model: dict[str, str]) -> str | None:
    """Why an incoming model looks poisoned, or None: the measurements behind guard.py's verdicts (each
    layer's change against the version this node last held, then the local validation loss; `evaluate` is
    None on a node without local data). Updates `run.incoming_loss` when the model passes."""
    g = run.spec["guard"]
    if not g["enabled"]:
        return None
    prev = run.model or run.init_state
    for name, h in sorted(model.items()):
        old = prev.get(name)
        if old is None or old == h or not store.has(old):
            continue
        try:
            rc = await trio.to_thread.run_sync(bundle_mod.relative_change, store.get_bytes(old), store.get_bytes(h),
                                               name)
        except bundle_mod.BundleError as exc:
            return f"layer {name}: {exc}"
        why = guard.layer_verdict(name, rc, g["max_rel_change"])
        if why is not None:
            return why
    if evaluate is None:
        return None
    try:
        res = await evaluate(run, model)
    except Exception as exc:  # noqa: BLE001 - the guard must not refuse honest work on a local failure
        log.warning("poison_check_unavailable", job=run.job_id, error=str(exc)[:200])
        return None
    verdict = guard.loss_verdict(state.lap, float(res.get("loss", float("nan"))), run.incoming_loss,
                                 g["val_loss_factor"])
    run.incoming_loss = verdict.reference
    return verdict.why


class Receiver:
    def __init__(self, ctx: NodeContext, registry: JobRegistry, journal: Journal, view: NetworkView,
                 modes: Modes) -> None:
        self.ctx = ctx
        self.registry = registry
        self.journal = journal
        self.view = view
        self.modes = modes
        self.counters = ctx.counters
        self.slot = ctx.slot
        self.on_received: Callable[[JobRun], None] = lambda run: None

    def register(self, cs_rpc: HandlerTable) -> None:
        cs_rpc.register("assign", self._on_assign)

    async def reaper(self) -> None:
        """Forget reservations whose bundle never came."""
        while True:
            await trio.sleep(REAP_EVERY_S)
            r = self.slot.reservation
            if r is not None and time.monotonic() > r.expires and r.run.phase == Phase.RESERVED:
                log.info("reservation_expired", job=r.run.job_id, hop=r.state.hop, proposer=r.proposer)
                self.counters.add("snake.reservation_expired")
                self.ctx.cancel_lane(r)
                self.slot.reservation = None
                r.run.phase = Phase.IDLE
                self.ctx.set_idle()

    # --- negotiation ------------------------------------------------------------------------------
    def _decline(self, job_id: str, reason: str, detail: str = "") -> Decline:
        self.counters.add(f"snake.decline.{reason}")
        log.info("declined", job=job_id, reason=reason, detail=detail[:200])
        return Decline(job_id, reason, detail)

    async def serve_negotiate(self, io: host_mod.StreamIO) -> None:
        kind, f = await io.read_frame(limit=NEGOTIATE_FRAME_LIMIT)
        if kind != "propose":
            raise wire.WireError(f"expected propose, got {kind!r}", "unexpected")
        await self._negotiate(io, f)

    async def _on_assign(self, io: host_mod.StreamIO, f: wire.Fields) -> None:
        """CS: the coordinator's `assign` is a Propose under another name."""
        await self._negotiate(io, f)

    async def _negotiate(self, io: host_mod.StreamIO, f: wire.Fields) -> None:
        p = Propose.from_wire(f)
        reply = await self._consider(io.peer, p)
        await io.write_frame(reply.to_wire())

    async def _consider(self, peer: str, p: Propose) -> Accept | Decline:
        # hang@accept outlasts the proposer's timeout, so the proposer sees no answer at all.
        if await self.ctx.faults.at_accept(PROPOSE_TIMEOUT_S * 2, hop=p.state.hop, attempt=p.state.attempt,
                                           job=p.job_id):
            return self._decline(p.job_id, "test_fault", "declining on purpose (--test-faults)")
        run = self.registry.jobs.get(p.job_id)
        if run is None:
            try:
                signed = SignedJob.decode(p.job)
                if signed.job_id != p.job_id:
                    return self._decline(p.job_id, "bad_job", "the signed job has another id")
                verify_job(signed, self.registry.trusted())
            except JobRejected as exc:
                self.counters.add(f"reject.job.{exc.reason}")
                return self._decline(p.job_id, "untrusted" if exc.reason == "untrusted_submitter" else "bad_job",
                                     str(exc))
            run = self.registry.intake(signed)
        if not run.joined:
            return self._decline(p.job_id, "not_joined", run.join_reason)
        why = self.modes.of(run).may_assign(run, peer)
        if why is not None:
            self.counters.add("reject.cs.not_coordinator")
            return self._decline(p.job_id, "not_coordinator", why)
        if not run.ready.is_set():
            return self._decline(p.job_id, "not_ready", run.error or "the job's model is still being built here")
        if p.state.holder != self.ctx.me:
            return self._decline(p.job_id, "error", "the proposal names another holder")
        if run.completed is not None:
            return self._decline(p.job_id, "stale", "the job is complete")
        if run.highest is not None and compare_claims(p.state.claim, run.highest) < 0 and \
                p.state.parent_lineage != run.highest.lineage:
            return self._decline(p.job_id, "stale", f"a later claim is known: hop {run.highest.hop} "
                                                    f"attempt {run.highest.attempt} {run.highest.lineage}")
        why = await self.journal.accept_custody(run, peer, p.custody, p.state.lineage)
        if why is None and run.custody.links[p.state.lineage].signer != peer:
            why = (f"the hand-over of hop {p.state.hop} was signed by {run.custody.links[p.state.lineage].signer}, "
                   f"not by the proposer")
        if why is not None:
            self.counters.add("reject.negotiate.custody")
            return self._decline(p.job_id, "custody", why)
        if self.slot.active is not None:
            return self._decline(p.job_id, "busy", f"holding a hop of job {self.slot.active}")
        r = self.slot.reservation
        if r is not None and time.monotonic() < r.expires and not (
                r.run.job_id == p.job_id and r.state.hop == p.state.hop):
            return self._decline(p.job_id, "busy", f"reserved for job {r.run.job_id} hop {r.state.hop}")
        size = self.view.window_size(run, p.state.prev_window)
        if size is None:
            return self._decline(p.job_id, "memory", f"no window of {run.spec['window']['min_blocks']}+ blocks fits "
                                                     f"{self.ctx.cfg.memory_mb} MB and {run.spec['window']['hop_time_s']} s")
        try:
            state = st.resize(p.state, size)
        except (st.StateError, ValueError) as exc:
            return self._decline(p.job_id, "error", f"cannot take the window: {exc}")
        if p.state.hop == 0:
            # hop 0 has no previous window: the size is all there is to decide.
            state = st.start_job(run.job_id, p.state.lap_members, self.ctx.me, size, run.blocks,
                                 attempt=p.state.attempt)  # the sender builds the same state on Accept
        self.ctx.cancel_lane(self.slot.reservation)
        reservation = Reservation(run, state, peer)
        self.slot.reservation = reservation
        offer = None
        if p.lane is not None and self.ctx.lane is not None:
            # The lane offer is bound to the Noise-authenticated proposer and to its certificate.
            offer = self.ctx.lane.expect(peer, p.lane, self.serve_bundle,
                                         advertise_port=self.ctx.cfg.lane_announce_port or None)
            reservation.lane_id = offer.lane_id
        run.phase = Phase.RESERVED
        self.ctx.svc.set_state(NodeState.RESERVED, run.job_id, state.hop)
        store = self.ctx.store
        hashes = set(p.layers.values())
        held = sorted(h for h in hashes if store.has(h))
        partial = {h: store.partial_offset(h) for h in hashes - set(held) if store.partial_offset(h) > 0}
        log.info("accepted", job=run.job_id, hop=state.hop, attempt=state.attempt, size=size, frm=peer,
                 held=len(held), resume=len(partial))
        return Accept(run.job_id, state.hop, state.attempt, size, held, partial, offer)

    # --- the bundle -------------------------------------------------------------------------------
    async def _evaluate(self, run: JobRun, model: dict[str, str]) -> dict[str, Any]:
        return await self.ctx.worker.call("evaluate", {"job": run.spec, "state": model,
                                                       "data": self.ctx.data_spec.to_dict(), "split": "val"})

    async def serve_bundle(self, io: host_mod.StreamIO | lane_mod.LaneIO) -> None:
        """A bundle on `/snake/bundle/1.0.0`, or on the fast bulk lane (a LaneIO whose `peer` is the proposer
        the lane offer was made to): the same checks either way."""
        on_lane = isinstance(io, lane_mod.LaneIO)
        store = self.ctx.store
        svc = self.ctx.svc
        kind, f = await io.read_frame(limit=BUNDLE_FRAME_LIMIT)
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
        r = self.slot.reservation
        if r is None or r.run.job_id != m.job or r.proposer != io.peer:
            raise wire.WireError("no proposal from you is pending here (negotiate first)", "not_proposed")
        if state.to_dict() != r.state.to_dict():
            raise wire.WireError(f"the manifest's job_state (hop {state.hop} attempt {state.attempt}) is not the "
                                 f"accepted one (hop {r.state.hop} attempt {r.state.attempt})", "stale")
        if not on_lane:
            self.ctx.cancel_lane(r)  # the sender chose (or fell back to) libp2p: the offer will not be used
        run = r.run
        try:
            m.check_against(run.schema)
        except bundle_mod.BundleError as exc:
            raise wire.WireError(str(exc), exc.code) from None
        if {e.name for e in m.layers} != set(run.schema):
            raise wire.WireError("the manifest does not list every layer of the model", "unknown_layer")
        r.expires = time.monotonic() + RESERVATION_S
        run.phase = Phase.RECEIVING
        svc.set_state(NodeState.RECEIVING, run.job_id, state.hop)
        try:
            received = await lane_mod.receive_layers(io, incoming, run.schema, store, faults=self.ctx.faults,
                                                     ctx={"hop": state.hop, "job": run.job_id})
        except transfer.TransferError as exc:
            run.phase = Phase.RESERVED
            svc.set_state(NodeState.RESERVED, run.job_id, state.hop)  # routable again, not stuck "receiving"
            raise wire.WireError(str(exc), exc.kind) from None
        model = {e.name: e.hash for e in m.layers}
        missing = [n for n, h in model.items() if not store.has(h)]
        if missing:
            run.phase = Phase.RESERVED
            raise wire.WireError(f"layers {missing[:5]} were neither sent nor held here", "incomplete")
        evaluate = None if self.ctx.data_spec is None else self._evaluate
        suspect = await poison_check(store, evaluate, run, state, model)
        if suspect is not None:
            self.counters.add("snake.poison_suspect")
            log.warning("poison_suspect", job=run.job_id, hop=state.hop, frm=io.peer, why=suspect)
            self.journal.record(run, "declined", state, detail={"reason": "poison_suspect", "detail": suspect,
                                                                "by": self.ctx.me})
            if self.slot.reservation is r:
                self.slot.reservation = None
                run.phase = Phase.IDLE
                self.ctx.set_idle()
            raise wire.WireError(f"poison_suspect: {suspect}", "poison_suspect")
        async with run.lock:
            if self.slot.reservation is not r:
                raise wire.WireError("the reservation was replaced by a later proposal", "stale")
            run.state, run.model, run.phase = state, model, Phase.RECEIVED
            run.observe(state.claim)
            run.save_checkpoint()
            self.slot.reservation = None
            self.slot.active = run.job_id
        await io.write_frame({"t": "ack", "job_id": run.job_id, "hop": state.hop, "attempt": state.attempt,
                              "bytes": received})
        path = "lane" if on_lane else "libp2p"
        self.journal.record(run, "received", state, t_recv=time.time(), bytes={"bundle_in": received},
                            detail={"path": path})
        log.info("bundle_received", job=run.job_id, hop=state.hop, attempt=state.attempt, frm=io.peer,
                 bytes=received, path=path)
        self.on_received(run)
