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
from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.net import transfer
from snakenode.snake import state as st
from snakenode.snake.messages import MAX_LAYERS, _hash_map, _state, decode_lane_cert, decode_lane_offer
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import JobState
from snakenode.snake.window import next_window

if TYPE_CHECKING:
    from snakenode.snake.p2p import Snake

log = logs.get("cs")

UPLOAD_RETRY_S = 2.0  # a node whose coordinator is unreachable retries the upload this often
CS_FALLBACK_S = 10.0  # with fallback = "p2p", after this long without a coordinator the node hands on itself


# After an upload_ok with a lane offer, how long the coordinator waits for the node to either connect the lane
# or send the bundle on the stream (the node tries the lane first: connect + TLS + hello, then falls back).
UPLOAD_CHOICE_S = lane_mod.CONNECT_TIMEOUT_S + lane_mod.HANDSHAKE_TIMEOUT_S + wire.READ_TIMEOUT_S
_BUNDLE_FRAME_LIMIT = bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024


class UploadRefused(Exception):
    pass


class _Upload:
    """One accepted upload on the coordinator: what it must commit, and which path carries its bundle (the
    first of the lane and the stream to claim it; the other is refused)."""

    def __init__(self, run: JobRun, baton: Any, base: JobState, layers: dict[str, str],
                 test: dict[str, float]) -> None:
        self.run, self.baton, self.base, self.layers, self.test = run, baton, base, layers, test
        self.via: str | None = None
        self.chosen = trio.Event()
        self.done = trio.Event()

    def choose(self, via: str) -> bool:
        if self.via is not None:
            return False
        self.via = via
        self.chosen.set()
        return True


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
        """`upload` / `upload_ok` on `/snake/cs/1.0.0`, then the bundle: over the fast bulk lane when the
        coordinator offered one and at least lane_min_mb is to move (the coordinator is the receiver, as the
        node is for a download), else, or when the lane cannot be set up, on this stream."""
        s = self.s
        entries = s._entries(run, model)
        cert = None
        if s.d.lane is not None and s._model_bytes(run, model) >= max(1, s._lane_threshold()):
            cert = lane_mod.LaneCert.generate()
        io = await host_mod.open_stream(s.svc.host, coord, wire.PROTO_CS, s.counters, "cs")
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
            items = transfer.plan_send(entries, held, _hash_map(f, "partial", values="offset"))
            manifest = bundle_mod.LayerBundle(run.job_id, base.to_dict(), entries)
            ctx = {"hop": base.hop, "job": run.job_id}
            planned = sum(it.entry.size - it.offset for it in items)
            path: dict[str, Any] = {"path": "libp2p"}
            if offer is not None and cert is not None and planned > 0 and planned >= s._lane_threshold():

                async def this_stream() -> host_mod.StreamIO:
                    return io  # the fallback: the bundle follows upload_ok on this stream, as without a lane

                res = await lane_mod.send_over_lane(s._lane_hosts(coord, lane_mod.remote_host(io)), offer, cert,
                                                    manifest, s.store, items, counters=s.counters,
                                                    fallback=this_stream, peer=coord, rate=s.faults.rate,
                                                    faults=s.faults, ctx=ctx)
                path = {"path": res["path"], **({"fallback": res["fallback"]} if res.get("fallback") else {})}
            else:
                res = await transfer.send_bundle(io, manifest, s.store, items, rate=s.faults.rate, faults=s.faults,
                                                 ctx=ctx)
        finally:
            await io.close()
        s._record(run, "handoff", base, bytes={"bundle_out": int(res["bytes"])}, t_handoff=time.time(),
                  detail={"upload": True, "to": coord, **path})
        log.info("uploaded", job=run.job_id, hop=base.hop, bytes=res["bytes"], layers=len(items), **path)

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
        cert = decode_lane_cert(f)
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
        upload = _Upload(run, b, base, layers, test)
        lane = self.s.d.lane
        if cert is None or lane is None:
            await io.write_frame({"t": "upload_ok", "held": held, "partial": partial})
            kind, g = await io.read_frame(limit=_BUNDLE_FRAME_LIMIT)
            await self._take_upload(io, kind, g, upload, "libp2p")
            return

        # The fast bulk lane, with this node as the receiver: the offer is bound to the Noise-authenticated
        # uploader and to the certificate of its `upload.lane`. The bundle then comes either over the lane or,
        # when the node could not set the lane up (or has too little to send), on this stream.
        async def over_lane(lio: lane_mod.LaneIO) -> None:
            if not upload.choose("lane"):
                raise wire.WireError("this upload already came on the libp2p stream", "unexpected")
            try:
                kind, g = await lio.read_frame(limit=_BUNDLE_FRAME_LIMIT)
                await self._take_upload(lio, kind, g, upload, "lane")
            finally:
                upload.done.set()

        offer = lane.expect(io.peer, cert, over_lane, advertise_port=self.s.cfg.lane_announce_port or None)
        try:
            await io.write_frame({"t": "upload_ok", "held": held, "partial": partial, "lane": offer.to_wire()})
            got = await self._stream_or_lane(io, upload)
        finally:
            lane.cancel(offer.lane_id)  # used, or the bundle came on the stream
        if got is None:
            await upload.done.wait()  # the lane handler has its own timeouts, counters and error frames
            return
        await self._take_upload(io, *got, upload, "libp2p")

    async def _stream_or_lane(self, io: host_mod.StreamIO, upload: _Upload) -> tuple[str, wire.Fields] | None:
        """After an `upload_ok` with a lane offer: the `bundle` frame when it comes on the stream (the node did
        not use the lane), None when the node's lane connection authenticated first."""
        got: tuple[str, wire.Fields] | None = None
        async with trio.open_nursery() as nursery:

            async def stream() -> None:
                nonlocal got
                try:
                    # The node tries the lane first: connect + TLS + hello may take their timeouts.
                    frame = await io.read_frame(limit=_BUNDLE_FRAME_LIMIT, timeout=UPLOAD_CHOICE_S)
                except (wire.WireError, trio.TooSlowError):
                    # The stream ended or stayed silent: fine if the bundle is on the lane.
                    with trio.move_on_after(1.0):
                        await upload.chosen.wait()
                    if upload.via != "lane":
                        raise
                else:
                    if upload.choose("libp2p"):
                        got = frame
                    elif upload.via == "lane":
                        raise wire.WireError("this upload is already coming over the lane", "unexpected")
                nursery.cancel_scope.cancel()

            async def lane() -> None:
                await upload.chosen.wait()
                if upload.via == "lane":
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stream)
            nursery.start_soon(lane)
        return got

    async def _take_upload(self, io: host_mod.StreamIO | lane_mod.LaneIO, kind: str, g: wire.Fields,
                           upload: _Upload, path: str) -> None:
        """The bundle of an accepted upload, from the stream or the lane: the same checks either way."""
        run, b, base, layers = upload.run, upload.baton, upload.base, upload.layers
        job_id = run.job_id
        if kind != "bundle":
            raise wire.WireError(f"expected bundle, got {kind!r}", "unexpected")
        try:
            incoming = transfer.decode_incoming(g)
            if {e.name: e.hash for e in incoming.manifest.layers} != layers:
                raise transfer.TransferError("the bundle's manifest differs from the upload", "unexpected")
            received = await lane_mod.receive_layers(io, incoming, run.schema, self.s.store, faults=self.s.faults,
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
        self.s._record(run, "committed", base, bytes={"bundle_in": received},
                       detail={"upload": True, "frm": io.peer, "path": path})
        log.info("upload_received", job=job_id, hop=base.hop, frm=io.peer, bytes=received, path=path)
        assert self.s.nursery is not None
        self.s.nursery.start_soon(self._next, run, base, dict(layers), upload.test)

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
