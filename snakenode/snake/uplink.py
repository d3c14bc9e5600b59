"""CS mode, node side: give the trained window back to the coordinator (`upload` on /snake/cs/1.0.0, then
the ordinary bundle, over the fast bulk lane when the coordinator offers one; snake/sender.py), waiting
while the coordinator is unreachable. With the job's `fallback = "p2p"`, a node that waited CS_FALLBACK_S
switches the job to P2P mode and hands the snake on itself. The coordinator's side is snake/coordinator.py.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.snake.context import NodeContext
from snakenode.snake.journal import Journal
from snakenode.snake.messages import _hash_map, decode_lane_offer
from snakenode.snake.phases import NodeState, Phase
from snakenode.snake.runtime import JobRun
from snakenode.snake.sender import Sender
from snakenode.snake.state import JobState

log = logs.get("cs")

UPLOAD_RETRY_S = 2.0  # a node whose coordinator is unreachable retries the upload this often
CS_FALLBACK_S = 10.0  # with fallback = "p2p", after this long without a coordinator the node hands on itself


class UploadRefused(Exception):
    pass


class Uplink:
    def __init__(self, ctx: NodeContext, journal: Journal, sender: Sender) -> None:
        self.ctx = ctx
        self.journal = journal
        self.sender = sender
        self.counters = ctx.counters

    async def hand_back(self, run: JobRun, base: JobState, model: dict[str, str], test: dict[str, float] | None
                        ) -> bool:
        """Upload the finished hop to the coordinator, waiting while it is unreachable. Returns False when
        this node switched the job to P2P mode (fallback) and must hand the snake on itself."""
        coord = run.spec["coordinator"]
        since = time.monotonic()
        announced = False
        while True:
            if run.completed is not None or run.phase == Phase.SUPERSEDED:
                return True
            if self.ctx.svc.table.is_live(coord):
                try:
                    await self._upload(run, coord, base, model, test)
                    return True
                except UploadRefused as exc:
                    log.warning("upload_refused", job=run.job_id, hop=base.hop, error=str(exc)[:200])
                    self.counters.add("cs.upload.refused")
                    return True  # the coordinator fenced this hop off: nothing to keep
                except Exception as exc:  # noqa: BLE001 - unreachable or broken: wait and retry
                    self.counters.add("cs.upload.failed")
                    log.info("upload_failed", job=run.job_id, hop=base.hop, error=f"{type(exc).__name__}: {exc}"[:200])
            if not announced:
                announced = True
                log.warning("waiting_for_coordinator", job=run.job_id, hop=base.hop, coordinator=coord,
                            fallback=run.spec.get("fallback"))
                self.ctx.svc.set_state(NodeState.WAITING, run.job_id, base.hop)
                run.phase = Phase.WAITING
                run.save_checkpoint()
            if run.spec.get("fallback") == "p2p" and time.monotonic() - since >= CS_FALLBACK_S:
                run.fallback = True
                self.counters.add("cs.fallback")
                log.warning("fallback_to_p2p", job=run.job_id, hop=base.hop, waited_s=round(time.monotonic() - since, 1))
                self.journal.record(run, "proposed", base, detail={"fallback": "p2p", "coordinator": coord})
                run.phase = Phase.HANDING_OFF
                return False
            await trio.sleep(UPLOAD_RETRY_S)

    async def _upload(self, run: JobRun, coord: str, base: JobState, model: dict[str, str],
                      test: dict[str, float] | None) -> None:
        """`upload` / `upload_ok` on `/snake/cs/1.0.0`, then the bundle: over the fast bulk lane when the
        coordinator offered one and at least lane_min_mb is to move (the coordinator is the receiver, as the
        node is for a download), else, or when the lane cannot be set up, on this stream."""
        self.ctx.faults.check("upload", hop=base.hop, attempt=base.attempt, job=run.job_id)
        cert = self.sender.lane_cert(run, model)
        io = await host_mod.open_stream(self.ctx.svc.host, coord, wire.PROTO_CS, self.counters, "cs")
        try:
            msg: dict[str, Any] = {"t": "upload", "job_id": run.job_id, "state": base.to_dict(), "layers": model,
                                   "test": test or {}}
            if cert is not None:
                msg["lane"] = lane_mod.propose_field(cert)
            await io.write_frame(msg)
            kind, f = await io.read_frame()
            if kind == "error":
                raise UploadRefused(f.str("error", 1000, required=False))
            if kind != "upload_ok":
                raise wire.WireError(f"expected upload_ok, got {kind!r}", "unexpected")
            held = set(f.raw("held", required=False, default=[]) or [])
            offer = decode_lane_offer(f) if cert is not None else None
            items = self.sender.plan(run, model, held, _hash_map(f, "partial", values="offset"))
            manifest = bundle_mod.LayerBundle(run.job_id, base.to_dict(), self.sender.entries(run, model))

            async def this_stream() -> host_mod.StreamIO:
                return io  # the bundle follows upload_ok on this stream (also the lane's fallback)

            sent = await self.sender.send(run, coord, manifest, items, stream=this_stream, owns_stream=False,
                                          offer=offer, cert=cert, via=lane_mod.remote_host(io),
                                          ctx={"hop": base.hop, "job": run.job_id})
        finally:
            await io.close()
        self.journal.record(run, "handoff", base, bytes={"bundle_out": sent.bytes}, t_handoff=time.time(),
                            detail={"upload": True, "to": coord, **sent.path})
        log.info("uploaded", job=run.job_id, hop=base.hop, bytes=sent.bytes, layers=len(items), **sent.path)
