"""CS mode: a coordinator peer plays the paper's Process Controller.

The coordinator is the job's permanent predecessor: it keeps the authoritative layers and job_state, plans
each hop with the same routing and window functions, assigns it (`assign` = the P2P `propose`, on
`/snake/cs/1.0.0`), serves the layers the node lacks (the ordinary bundle stream), holds the baton while
the node trains (the node renews its lease with the coordinator), and receives the trained window back
(`upload`: the ordinary bundle format, on `/snake/cs/1.0.0`). Everything else — negotiation, transfer,
leases, retries, fencing, the hop log — is the same code as in P2P mode (snake/holder.py, handoff.py,
receiver.py): the two modes differ only in who decides and where the baton rests (snake/modes.py). The
node's side of the upload is snake/uplink.py.

Coordinator lost: nodes finish their hop, keep the result and wait (profile state `waiting`, retrying the
upload); a coordinator restarted with the same HOME picks the job up from its checkpoint. When the job
allows `fallback = "p2p"`, a node that waited `uplink.CS_FALLBACK_S` hands the snake on itself in P2P mode,
and the job stays in P2P mode from then on.
"""

from __future__ import annotations

from typing import Any

import trio

from snakenode import logs, wire
from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.net import transfer
from snakenode.snake import state as st
from snakenode.snake.context import NodeContext
from snakenode.snake.holder import Holder
from snakenode.snake.journal import Journal
from snakenode.snake.messages import MAX_LAYERS, _hash_map, _state, decode_lane_cert
from snakenode.snake.modes import Modes
from snakenode.snake.phases import Phase
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import HandlerTable
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import JobState
from snakenode.snake.view import NetworkView
from snakenode.snake.window import next_window

log = logs.get("cs")

# After an upload_ok with a lane offer, how long the coordinator waits for the node to either connect the lane
# or send the bundle on the stream (the node tries the lane first: connect + TLS + hello, then falls back).
UPLOAD_CHOICE_S = lane_mod.CONNECT_TIMEOUT_S + lane_mod.HANDSHAKE_TIMEOUT_S + wire.READ_TIMEOUT_S
_BUNDLE_FRAME_LIMIT = bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024


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


class Coordinator:
    """The coordinator's own work in a CS job; everything else is the holder's (snake/holder.py), which it
    drives through public methods only."""

    def __init__(self, ctx: NodeContext, registry: JobRegistry, journal: Journal, view: NetworkView,
                 holder: Holder, modes: Modes) -> None:
        self.ctx = ctx
        self.registry = registry
        self.journal = journal
        self.view = view
        self.holder = holder
        self.modes = modes

    def register(self, cs_rpc: HandlerTable) -> None:
        cs_rpc.register("upload", self._receive_upload)

    # --- coordinator side ----------------------------------------------------------------------------
    async def _receive_upload(self, io: host_mod.StreamIO, f: wire.Fields) -> None:
        job_id = f.str("job_id", 16, pattern=wire.JOB_ID_RE)
        base = _state(f)
        layers = _hash_map(f, "layers")
        cert = decode_lane_cert(f)
        test = {k: float(v) for k, v in (f.raw("test", required=False) or {}).items()
                if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)}
        run = self.registry.jobs.get(job_id)
        if run is None or not self.modes.coordinates(run):
            raise wire.WireError(f"this node does not coordinate job {job_id}", "not_coordinator")
        b = run.baton
        if (b is None or b.released or b.successor != io.peer or base.lineage != b.proposed.lineage
                or not base.finished or base.job_id != job_id):
            raise wire.WireError("no assignment of this hop to you is pending here (it may have been "
                                 "reassigned)", "stale")
        if set(layers) != set(run.schema) or len(layers) > MAX_LAYERS:
            raise wire.WireError("the upload does not list every layer of the model", "unknown_layer")
        held = sorted(h for h in set(layers.values()) if self.ctx.store.has(h))
        partial = {h: self.ctx.store.partial_offset(h) for h in set(layers.values()) - set(held)
                   if self.ctx.store.partial_offset(h) > 0}
        upload = _Upload(run, b, base, layers, test)
        lane = self.ctx.lane
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

        offer = lane.expect(io.peer, cert, over_lane, advertise_port=self.ctx.cfg.lane_announce_port or None)
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
            received = await lane_mod.receive_layers(io, incoming, run.schema, self.ctx.store, faults=self.ctx.faults,
                                                     ctx={"hop": base.hop, "job": job_id})
        except transfer.TransferError as exc:
            raise wire.WireError(str(exc), exc.kind) from None
        missing = [n for n, h in layers.items() if not self.ctx.store.has(h)]
        if missing:
            raise wire.WireError(f"layers {missing[:4]} were neither sent nor held here", "incomplete")
        async with run.lock:
            if run.baton is not b or b.released:
                raise wire.WireError("the hop was reassigned while uploading", "stale")
            b.released = True
            b.event.set()
            run.state, run.model, run.phase = base, dict(layers), Phase.TRAINED
            run.observe(base.claim)
            run.save_checkpoint()
        await io.write_frame({"t": "ack", "job_id": job_id, "hop": base.hop, "bytes": received})
        self.journal.record(run, "committed", base, bytes={"bundle_in": received},
                            detail={"upload": True, "frm": io.peer, "path": path})
        log.info("upload_received", job=job_id, hop=base.hop, frm=io.peer, bytes=received, path=path)
        self.ctx.tasks.start_soon(self._next, run, base, dict(layers), upload.test)

    async def _next(self, run: JobRun, base: JobState, model: dict[str, str], test: dict[str, float]) -> None:
        """Plan and assign the next hop, or complete the job."""
        if st.job_done(base, run.spec):
            await self.holder.complete(run, base, test=test)
            return
        run.phase = Phase.HANDING_OFF
        await self.holder.hand_on(run, base, model)

    def schedule(self) -> list[dict[str, Any]]:
        """`status` on a coordinator: each CS job's holder and the planned next hops and windows."""
        out = []
        for run in self.registry.jobs.values():
            if not self.modes.coordinates(run) or run.completed is not None:
                continue
            entry: dict[str, Any] = {"job_id": run.job_id, "phase": run.phase}
            b = run.baton
            if b is not None and not b.released:
                entry["assigned"] = {"hop": b.proposed.hop, "attempt": b.proposed.attempt, "holder": b.successor,
                                     "window": b.proposed.window.to_log()}
            base = run.state if run.state is not None and run.state.finished else (b.base if b else None)
            if base is not None and base.finished and st.lap_remaining(base):
                ranking = self.view.rank(run, base, {})
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
