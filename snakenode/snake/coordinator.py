"""CS mode: a coordinator peer plays the paper's Process Controller.

The coordinator is the job's permanent predecessor: it keeps the authoritative layers and job_state, plans
each hop with the same routing and window functions, assigns it (`assign` = the P2P `propose`, on
`/snake/cs/1.0.0`), serves the layers the node lacks (the ordinary bundle stream), holds the baton while
the node trains (the node renews its lease with the coordinator), and receives the trained window back
(`upload`: the ordinary bundle format, on `/snake/cs/1.0.0`). Everything else — negotiation, transfer,
leases, retries, fencing, the hop log — is snake/p2p.py's code: the two modes differ only in who decides
and where the baton rests.

Coordinator lost: nodes finish their hop, keep the result and wait (profile state `waiting`, retrying the
upload); a coordinator restarted with the same HOME picks the job up from its checkpoint. When the job
allows `fallback = "p2p"`, a node that waited `CS_FALLBACK_S` hands the snake on itself in P2P mode, and
the job stays in P2P mode from then on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from snakenode import logs, wire
from snakenode.net import host as host_mod
from snakenode.net import transfer
from snakenode.snake import bundle as bundle_mod
from snakenode.snake import state as st
from snakenode.snake.messages import MAX_LAYERS, _hash_map, _state
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import JobState
from snakenode.snake.window import next_window

if TYPE_CHECKING:
    from snakenode.snake.p2p import Snake

log = logs.get("cs")

UPLOAD_RETRY_S = 2.0  # a node whose coordinator is unreachable retries the upload this often
CS_FALLBACK_S = 10.0  # with fallback = "p2p", after this long without a coordinator the node hands on itself


class UploadRefused(Exception):
    pass


class CS:
    def __init__(self, snake: Snake) -> None:
        self.s = snake

    # --- who gives orders -----------------------------------------------------------------------
    @staticmethod
    def is_cs(run: JobRun) -> bool:
        return run.spec["mode"] == "cs" and not run.fallback

    def is_coordinator(self, run: JobRun) -> bool:
        return run.spec["mode"] == "cs" and run.spec.get("coordinator") == self.s.me

    def may_assign(self, run: JobRun, peer: str) -> str | None:
        """None when `peer` may give this node a hop of `run`, else why not."""
        if run.spec["mode"] != "cs" or peer == run.spec["coordinator"]:
            return None
        if run.spec.get("fallback") == "p2p" and not self.s.svc.table.is_live(run.spec["coordinator"]):
            run.fallback = True  # the coordinator is gone and the job allows P2P: follow the holders
            return None
        return (f"job {run.job_id} runs in CS mode: only its coordinator {run.spec['coordinator']} assigns hops "
                f"(fallback {run.spec.get('fallback')})")

    def lease_target(self, run: JobRun, state: JobState) -> str | None:
        """The baton rests with the coordinator in CS mode, with the previous holder in P2P mode."""
        if self.is_cs(run):
            return run.spec["coordinator"]
        return state.prev_holder

    # --- node side: give the trained window back ---------------------------------------------------
    async def hand_back(self, run: JobRun, base: JobState, model: dict[str, str], test: dict[str, float] | None
                        ) -> bool:
        """Upload the finished hop to the coordinator, waiting while it is unreachable. Returns False when
        this node switched the job to P2P mode (fallback) and must hand the snake on itself."""
        coord = run.spec["coordinator"]
        since = time.monotonic()
        announced = False
        while True:
            if run.completed is not None or run.phase == "superseded":
                return True
            if self.s.svc.table.is_live(coord):
                try:
                    await self._upload(run, coord, base, model, test)
                    return True
                except UploadRefused as exc:
                    log.warning("upload_refused", job=run.job_id, hop=base.hop, error=str(exc)[:200])
                    self.s.counters.add("cs.upload.refused")
                    return True  # the coordinator fenced this hop off: nothing to keep
                except Exception as exc:  # noqa: BLE001 - unreachable or broken: wait and retry
                    self.s.counters.add("cs.upload.failed")
                    log.info("upload_failed", job=run.job_id, hop=base.hop, error=f"{type(exc).__name__}: {exc}"[:200])
            if not announced:
                announced = True
                log.warning("waiting_for_coordinator", job=run.job_id, hop=base.hop, coordinator=coord,
                            fallback=run.spec.get("fallback"))
                self.s.svc.set_state("waiting", run.job_id, base.hop)
                run.phase = "waiting"
                run.save_checkpoint()
            if run.spec.get("fallback") == "p2p" and time.monotonic() - since >= CS_FALLBACK_S:
                run.fallback = True
                self.s.counters.add("cs.fallback")
                log.warning("fallback_to_p2p", job=run.job_id, hop=base.hop, waited_s=round(time.monotonic() - since, 1))
                self.s._record(run, "proposed", base, detail={"fallback": "p2p", "coordinator": coord})
                run.phase = "handing_off"
                return False
            await trio.sleep(UPLOAD_RETRY_S)

    async def _upload(self, run: JobRun, coord: str, base: JobState, model: dict[str, str],
                      test: dict[str, float] | None) -> None:
        io = await host_mod.open_stream(self.s.svc.host, coord, wire.PROTO_CS, self.s.counters, "cs")
        try:
            await io.write_frame({"t": "upload", "job_id": run.job_id, "state": base.to_dict(), "layers": model,
                                  "test": test or {}})
            kind, f = await io.read_frame()
            if kind == "error":
                raise UploadRefused(f.str("error", 1000, required=False))
            if kind != "upload_ok":
                raise wire.WireError(f"expected upload_ok, got {kind!r}", "unexpected")
            held = set(f.raw("held", required=False, default=[]) or [])
            items = transfer.plan_send(self.s._entries(run, model), held, _hash_map(f, "partial", values="offset"))
            manifest = bundle_mod.LayerBundle(run.job_id, base.to_dict(), self.s._entries(run, model))
            res = await transfer.send_bundle(io, manifest, self.s.store, items, rate=self.s.faults.rate,
                                             faults=self.s.faults, ctx={"hop": base.hop, "job": run.job_id})
        finally:
            await io.close()
        self.s._record(run, "handoff", base, bytes={"bundle_out": int(res["bytes"])}, t_handoff=time.time(),
                       detail={"upload": True, "to": coord})
        log.info("uploaded", job=run.job_id, hop=base.hop, bytes=res["bytes"], layers=len(items))

    # --- coordinator side ----------------------------------------------------------------------------
    async def serve(self, io: host_mod.StreamIO) -> None:
        kind, f = await io.read_frame(limit=2 * 2**20)
        if kind == "assign":
            await self.s._negotiate(io, f)
        elif kind == "upload":
            await self._receive_upload(io, f)
        else:
            raise wire.WireError(f"unknown cs message {kind!r}", "unexpected")

    async def _receive_upload(self, io: host_mod.StreamIO, f: wire.Fields) -> None:
        job_id = f.str("job_id", 16, pattern=wire.JOB_ID_RE)
        base = _state(f)
        layers = _hash_map(f, "layers")
        test = {k: float(v) for k, v in (f.raw("test", required=False) or {}).items()
                if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)}
        run = self.s.jobs.get(job_id)
        if run is None or not self.is_coordinator(run):
            raise wire.WireError(f"this node does not coordinate job {job_id}", "not_coordinator")
        b = run.baton
        if (b is None or b.released or b.successor != io.peer or base.lineage != b.proposed.lineage
                or not base.finished or base.job_id != job_id):
            raise wire.WireError("no assignment of this hop to you is pending here (it may have been "
                                 "reassigned)", "stale")
        if set(layers) != set(run.schema) or len(layers) > MAX_LAYERS:
            raise wire.WireError("the upload does not list every layer of the model", "unknown_layer")
        held = sorted(h for h in set(layers.values()) if self.s.store.has(h))
        partial = {h: self.s.store.partial_offset(h) for h in set(layers.values()) - set(held)
                   if self.s.store.partial_offset(h) > 0}
        await io.write_frame({"t": "upload_ok", "held": held, "partial": partial})
        kind, g = await io.read_frame(limit=bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024)
        if kind != "bundle":
            raise wire.WireError(f"expected bundle, got {kind!r}", "unexpected")
        try:
            incoming = transfer.decode_incoming(g)
            if {e.name: e.hash for e in incoming.manifest.layers} != layers:
                raise transfer.TransferError("the bundle's manifest differs from the upload", "unexpected")
            received = await transfer.receive_layers(io, incoming, run.schema, self.s.store, faults=self.s.faults,
                                                     ctx={"hop": base.hop, "job": job_id})
        except transfer.TransferError as exc:
            raise wire.WireError(str(exc), exc.kind) from None
        missing = [n for n, h in layers.items() if not self.s.store.has(h)]
        if missing:
            raise wire.WireError(f"layers {missing[:4]} were neither sent nor held here", "incomplete")
        async with run.lock:
            if run.baton is not b or b.released:
                raise wire.WireError("the hop was reassigned while uploading", "stale")
            b.released = True
            b.event.set()
            run.state, run.model, run.phase = base, dict(layers), "trained"
            run.observe(base.claim)
            run.save_checkpoint()
        await io.write_frame({"t": "ack", "job_id": job_id, "hop": base.hop, "bytes": received})
        self.s._record(run, "committed", base, bytes={"bundle_in": received}, detail={"upload": True, "frm": io.peer})
        log.info("upload_received", job=job_id, hop=base.hop, frm=io.peer, bytes=received)
        assert self.s.nursery is not None
        self.s.nursery.start_soon(self._next, run, base, dict(layers), test)

    async def _next(self, run: JobRun, base: JobState, model: dict[str, str], test: dict[str, float]) -> None:
        """Plan and assign the next hop, or complete the job."""
        if st.job_done(base, run.spec):
            await self.s._complete(run, base, test=test)
            return
        run.phase = "handing_off"
        await self.s._handoff(run, base, model)

    def schedule(self) -> list[dict[str, Any]]:
        """`status` on a coordinator: each CS job's holder and the planned next hops and windows."""
        out = []
        for run in self.s.jobs.values():
            if not self.is_coordinator(run) or run.completed is not None:
                continue
            entry: dict[str, Any] = {"job_id": run.job_id, "phase": run.phase}
            b = run.baton
            if b is not None and not b.released:
                entry["assigned"] = {"hop": b.proposed.hop, "attempt": b.proposed.attempt, "holder": b.successor,
                                     "window": b.proposed.window.to_log()}
            base = run.state if run.state is not None and run.state.finished else (b.base if b else None)
            if base is not None and base.finished and st.lap_remaining(base):
                ranking = self.s._rank(run, base, {})
                size = min(int(run.spec["window"]["max_blocks"]), run.blocks)
                planned = []
                prev = base.window
                for ch in ranking.choices[: max(1, len(st.lap_remaining(base)))]:
                    w = next_window(prev, size, run.blocks)
                    planned.append({"peer": ch.peer_id, "score": ch.score, "window": w.to_log()})
                    prev = w
                entry["planned"] = planned
            out.append(entry)
        return out
