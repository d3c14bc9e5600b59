"""The snake on a node: the thin front that composes its parts, wires them to the network and answers the
daemon's control commands. Each part has one job (docs/ARCHITECTURE.md, "The snake on a node"):

  registry.py  the jobs this node knows: trust, intake, model building, announcements
  journal.py   hop records, progress gossip, chain of custody
  view.py      members, candidates, down times, reference histogram, window sizing
  receiver.py  answering proposals, reservations, taking bundles in (+ guard.py's verdicts)
  sender.py    sending layers (libp2p or the fast bulk lane, bf16 packing), for P2P and CS
  handoff.py   proposing and handing on, over retry.py's pure policy
  holder.py    holding a hop: train, lease, supersede, complete
  uplink.py / coordinator.py   CS mode, node side / coordinator side (modes.py says who gives orders)
  recovery.py  restart recovery and `resume`
  views.py     `jobs`, `job`/`watch`, `fetch`

A hop at holder H (docs/PROTOCOL.md): apply the bundle -> train the window in the worker -> publish
progress -> rank candidates from their gossiped profiles -> negotiate (Propose -> Accept | Decline) ->
transfer the layers the successor lacks -> keep the baton while the successor renews its lease -> drop it
once the successor reports that it handed the next hop on. A lapsed lease or a disconnect makes H retry the
hop as the next attempt with another candidate; `(hop, attempt)` and the lineage hash chain fence off the
loser, which stops and logs `superseded`.
"""

from __future__ import annotations

from typing import Any

import trio

from snakenode import wire
from snakenode.snake.context import NodeContext
from snakenode.snake.coordinator import Coordinator
from snakenode.snake.handoff import Handoff
from snakenode.snake.holder import Holder
from snakenode.snake.journal import Journal
from snakenode.snake.modes import Modes
from snakenode.snake.receiver import NEGOTIATE_FRAME_LIMIT, Receiver
from snakenode.snake.recovery import Recovery
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import STATE_REQUEST_LIMIT, HandlerTable, StateClient
from snakenode.snake.runtime import JobRun
from snakenode.snake.sender import Sender
from snakenode.snake.uplink import Uplink
from snakenode.snake.view import NetworkView
from snakenode.snake.views import ControlViews


class Snake:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        client = StateClient(ctx.svc)
        self.modes = Modes(ctx.me, ctx.svc.table.is_live)
        self.registry = JobRegistry(ctx, client)
        self.view = NetworkView(ctx)
        self.journal = Journal(ctx, client, self.registry.jobs)
        self.sender = Sender(ctx, self.view)
        self.receiver = Receiver(ctx, self.registry, self.journal, self.view, self.modes)
        self.handoff = Handoff(ctx, self.view, self.journal, self.sender, self.modes, client, self.registry)
        self.uplink = Uplink(ctx, self.journal, self.sender)
        self.holder = Holder(ctx, self.registry, self.journal, self.view, self.handoff, self.uplink, self.modes,
                             client)
        self.coordinator = Coordinator(ctx, self.registry, self.journal, self.view, self.holder, self.modes)
        self.recovery = Recovery(ctx, self.registry, self.journal, self.holder, self.handoff, client)
        self.views = ControlViews(ctx, self.registry, client.request, self.registry.prepare)
        self.journal.on_claim = self.holder.on_claim
        self.receiver.on_received = self.holder.start_holding
        # Each owner registers the request kinds it answers.
        self.state_rpc = HandlerTable(wire.PROTO_STATE, "state", STATE_REQUEST_LIMIT)
        for part in (self.registry, self.journal, self.holder, self.recovery, self.views):
            part.register(self.state_rpc)
        self.cs_rpc = HandlerTable(wire.PROTO_CS, "cs", NEGOTIATE_FRAME_LIMIT)
        self.receiver.register(self.cs_rpc)
        self.coordinator.register(self.cs_rpc)
        self._jobs_topic = {"job": self.registry.on_job_msg, "complete": self._on_complete_msg}

    @property
    def jobs(self) -> dict[str, JobRun]:
        return self.registry.jobs

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        svc = self.ctx.svc
        if svc.gossip is None:
            raise RuntimeError("the snake runs inside a started NetService (its gossip is not up)")
        svc.register_protocol(wire.PROTO_NEGOTIATE, "negotiate", self.receiver.serve_negotiate)
        svc.register_protocol(wire.PROTO_BUNDLE, "bundle", self.receiver.serve_bundle)
        svc.register_protocol(wire.PROTO_STATE, "state", self.state_rpc.serve)
        svc.register_protocol(wire.PROTO_CS, "cs", self.cs_rpc.serve)
        svc.gossip.on("jobs", self._on_jobs_msg)
        svc.gossip.on("progress", self.journal.on_progress_msg)
        svc.peer_events.append(self.view.on_peer_event)
        svc.profile_events.append(self.registry.on_peer_profile)
        self.registry.load()
        async with trio.open_nursery() as nursery:
            self.ctx.tasks.bind(nursery)
            for run in self.jobs.values():
                if run.joined or run.origin:
                    nursery.start_soon(self.registry.prepare, run)
                nursery.start_soon(self.recovery.recover, run)
            nursery.start_soon(self.receiver.reaper)
            self.registry.update_profile()
            task_status.started()
            await trio.sleep_forever()

    async def _on_jobs_msg(self, sender: str, obj: dict[str, Any]) -> None:
        f = wire.Fields(obj, "jobs")
        kind = f.str("t", 16)
        handler = self._jobs_topic.get(kind)
        if handler is None:
            raise wire.WireError(f"unknown jobs message {kind!r}", "unexpected")
        await handler(sender, f)

    async def _on_complete_msg(self, sender: str, f: wire.Fields) -> None:
        await self.holder.on_complete(sender, f.obj)

    # --- control commands -------------------------------------------------------------------------
    async def submit(self, raw: bytes) -> dict[str, Any]:
        run = self.registry.take_submission(raw)
        await self.registry.announce(raw)
        self.ctx.tasks.start_soon(self.holder.originate, run)
        self.ctx.tasks.start_soon(self.registry.reannounce, run, raw)
        return {"job_id": run.job_id, "joined": run.joined, "name": run.spec.get("name")}

    def trusted(self) -> set[str]:
        return self.registry.trusted()

    def set_extra_trusted(self, peers: set[str]) -> None:
        self.registry.extra_trusted = set(peers)

    def resolve(self, job_id: str) -> str:
        return self.registry.resolve(job_id).job_id

    def jobs_view(self) -> list[dict[str, Any]]:
        return self.views.jobs_view()

    def job_detail(self, job_id: str, since: int = 0) -> dict[str, Any]:
        return self.views.job_detail(job_id, since)

    async def collect(self, job_id: str) -> None:
        await self.journal.collect(self.registry.resolve(job_id))

    async def fetch(self, job_id: str, out: str) -> dict[str, Any]:
        return await self.views.fetch(job_id, out)

    async def resume(self, job_id: str) -> dict[str, Any]:
        return await self.recovery.resume(job_id)

    def status(self) -> dict[str, Any]:
        """The snake's part of `status --json`."""
        r = self.ctx.slot.reservation
        return {"active": self.ctx.slot.active,
                "reservation": None if r is None else {"job": r.run.job_id, "hop": r.state.hop, "from": r.proposer}}

    def schedule(self) -> list[dict[str, Any]]:
        return self.coordinator.schedule()
