"""What the control commands see and fetch: `jobs` (one summary per job), `job`/`watch` (a job's summary
and hop records, with the local training progress), and `fetch` (the completed model as one safetensors
file, its missing layers pulled from live peers with `get_layers` on /snake/state/1.0.0, which this
module also serves).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.control import ControlError
from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net import transfer
from snakenode.snake.context import NodeContext
from snakenode.snake.messages import decode_layer_list
from snakenode.snake.phases import Phase
from snakenode.snake.registry import JobRegistry
from snakenode.snake.rpc import HandlerTable
from snakenode.snake.runtime import JobRun

log = logs.get("snake")

PREPARE_FOR_FETCH_S = 120.0


def job_summary(run: JobRun) -> dict[str, Any]:
    recs = run.records()
    trained = [r for r in recs if r["event"] == "trained"]
    last = trained[-1] if trained else None
    s = run.state
    status = "complete" if run.completed else ("running" if recs else ("pending" if run.ready.is_set() else
                                                                       "preparing"))
    if run.error and not recs:
        status = "error"
    bytes_total = sum(r["bytes"]["bundle_out"] + r["bytes"]["negotiate"] for r in recs if r["node"])
    return {
        "job_id": run.job_id, "name": run.spec.get("name"), "model": run.spec["model"],
        "dataset": run.spec["dataset"], "mode": run.spec["mode"], "status": status,
        "joined": run.joined, "join_reason": run.join_reason, "phase": str(run.phase),
        "submitter": run.signed.submitter, "laps": run.spec["laps"], "blocks": run.blocks,
        "hop": None if last is None else last["hop"], "lap": None if last is None else last["lap"],
        "holder": None if last is None else last["holder"],
        "window": None if last is None else last["window"],
        "metrics": None if last is None else last["metrics_after"],
        # The worker's latest progress event while this node trains a hop (watch shows it live).
        "training": dict(run.last_metrics) if run.phase == Phase.TRAINING and run.last_metrics else None,
        "local_state": None if s is None else {"hop": s.hop, "attempt": s.attempt, "lap": s.lap},
        "completed": run.completed, "error": run.error or None, "records": len(recs),
        "bytes_total": bytes_total,
    }


class ControlViews:
    def __init__(self, ctx: NodeContext, registry: JobRegistry,
                 request: Callable[[str, dict[str, Any]], Awaitable[tuple[str, wire.Fields]]],
                 prepare: Callable[[JobRun], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.registry = registry
        self.request = request
        self.prepare = prepare

    def register(self, state_rpc: HandlerTable) -> None:
        state_rpc.register("get_layers", self._serve_layers)

    def jobs_view(self) -> list[dict[str, Any]]:
        return [job_summary(r) for r in sorted(self.registry.jobs.values(), key=lambda r: r.signed.created)]

    def job_detail(self, job_id: str, since: int = 0) -> dict[str, Any]:
        run = self.registry.resolve(job_id)
        recs = run.records()
        return {"summary": job_summary(run), "records": recs[since:], "total": len(recs), "spec": run.spec}

    # --- fetch ------------------------------------------------------------------------------------
    async def _serve_layers(self, io: host_mod.StreamIO, f: wire.Fields) -> None:
        store = self.ctx.store
        hashes = decode_layer_list(f)
        have = [(h, store.size(h)) for h in hashes if store.has(h)]
        await io.write_frame({"t": "layers", "have": [{"hash": h, "size": n} for h, n in have]})
        for h, _size in have:
            with open(store.path(h), "rb") as fh:
                while chunk := fh.read(transfer.CHUNK):
                    await io.write(chunk)

    async def _pull_layers(self, run: JobRun, peer: str, wanted: dict[str, str]) -> int:
        """Fetch layers (name -> hash) from a peer into the store, verified against the schema."""
        store = self.ctx.store
        io = await host_mod.open_stream(self.ctx.svc.host, peer, wire.PROTO_STATE, self.ctx.counters, "fetch")
        got = 0
        try:
            await io.write_frame({"t": "get_layers", "hashes": sorted(set(wanted.values()))})
            kind, f = await io.read_frame()
            if kind != "layers":
                raise ControlError(f"peer answered {kind!r} to get_layers", "fetch_failed")
            by_hash = {h: n for n, h in wanted.items()}
            for i, item in enumerate(f.raw("have")):
                g = wire.Fields(item, f"have[{i}]")
                h, size = g.str("hash", 64, pattern=wire.HEX64_RE), g.int("size")
                name = by_hash.get(h)
                if name is None or size != run.schema[name].size:
                    raise ControlError(f"peer offered an unexpected layer {h[:12]}", "fetch_failed")
                entry = bundle_mod.LayerEntry(name, h, size, run.schema[name].tensors)
                got += await transfer.receive_layers(
                    io, transfer.Incoming(bundle_mod.LayerBundle(run.job_id, {}, [entry]),
                                          [transfer.SendItem(entry, store.partial_offset(h))]),
                    run.schema, store) if not store.has(h) else 0
        finally:
            await io.close()
        return got

    async def fetch(self, job_id: str, out: str) -> dict[str, Any]:
        store = self.ctx.store
        svc = self.ctx.svc
        run = self.registry.jobs.get(job_id)
        if run is None:
            raise ControlError(f"job {job_id} is not known on this node (`snakenode jobs` lists them)", "unknown_job")
        c = run.completed
        if c is None:
            raise ControlError(f"job {job_id} has not completed yet (`snakenode watch {job_id}` shows progress)",
                               "not_complete")
        if not run.schema:
            with trio.move_on_after(PREPARE_FOR_FETCH_S):
                await self.prepare(run)
            if not run.schema:
                raise ControlError(f"cannot build job {job_id}'s model here: {run.error}", "fetch_failed")
        model: dict[str, str] = c["model"]
        missing = {n: h for n, h in model.items() if not store.has(h)}
        pulled = 0
        if missing:
            sources = [c["holder"]] + [e.peer_id for e in svc.table.live() if e.peer_id != c["holder"]]
            for peer in sources:
                if not svc.table.is_live(peer):
                    continue
                try:
                    pulled += await self._pull_layers(run, peer, missing)
                except Exception as exc:  # noqa: BLE001 - try the next source
                    log.warning("fetch_from_peer_failed", job=job_id, peer=peer, error=str(exc)[:200])
                missing = {n: h for n, h in missing.items() if not store.has(h)}
                if not missing:
                    break
            if missing:
                raise ControlError(f"layers {sorted(missing)[:4]} of the final model are on no live node",
                                   "fetch_failed")
        path = Path(out)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        layers = [(n, store.get_bytes(model[n])) for n in sorted(model)]
        meta = {"snakenode.job_id": job_id, "snakenode.model": str(run.spec["model"]),
                "snakenode.hop": str(c["hop"]), "snakenode.lineage": str(c["lineage"])}
        with open(tmp, "wb") as fh:
            bundle_mod.write_model_file(fh, layers, metadata=meta)
        os.replace(tmp, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"job_id": job_id, "path": str(path), "bytes": path.stat().st_size, "sha256": digest,
                "layers": model, "pulled_bytes": pulled, "hop": c["hop"], "holder": c["holder"],
                "test": c.get("test", {})}
