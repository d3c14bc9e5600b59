"""The training daemon: the network service plus local data, the worker, and the snake protocol.

The daemon never imports torch; the worker process does all torch work and is started when first
needed (the compute benchmark at first start, then jobs). Its result is cached in HOME so later starts
advertise compute at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import trio

from snakenode import logs
from snakenode.config import NodeConfig
from snakenode.control import ControlError
from snakenode.faults import TEST_RAISE_PROTOCOL, Faults
from snakenode.home import write_json_atomic
from snakenode.identity import Identity
from snakenode.net.lane.server import LaneServer
from snakenode.net.service import NetService
from snakenode.snake.context import NodeContext
from snakenode.snake.node import Snake

log = logs.get("daemon")

COMPUTE_CACHE = "cache/compute.json"
# The worker is closed after this long without work, so an idle node stays small (no torch in memory).
WORKER_IDLE_S = 60.0


class Worker:
    """The torch worker as the snake uses it (snake/context.py's WorkerPort): started when first needed,
    one call at a time, closed after WORKER_IDLE_S without work."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.client: Any = None  # train.client.WorkerClient while the worker process runs
        self.lock = trio.Lock()
        self._last_used = 0.0

    def _get(self) -> Any:
        if self.client is None:
            from snakenode.train.client import WorkerClient  # the training package loads only when needed

            self.client = WorkerClient(self.cfg.home, threads=self.cfg.threads, nice=self.cfg.worker_nice)
        return self.client

    async def call(self, op: str, args: dict[str, Any], on_event: Any = None) -> Any:
        async with self.lock:
            try:
                return await self._get().call(op, args, on_event=on_event)
            finally:
                self._last_used = time.monotonic()

    async def cancel(self) -> None:
        """Kill the running call's worker (the next call starts a new one)."""
        if self.client is not None:
            await self.client.cancel()

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    async def reaper(self) -> None:
        while True:
            await trio.sleep(5)
            if (self.client is not None and not self.lock.locked()
                    and time.monotonic() - self._last_used > WORKER_IDLE_S):
                async with self.lock:
                    await self.client.aclose()
                    self.client = None
                    log.debug("worker_closed", reason="idle")

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def status(self) -> dict[str, Any]:
        w = self.client
        return {"running": bool(w is not None and w.running), "pid": None if w is None else w.pid,
                "busy": self.lock.locked()}


class Daemon:
    def __init__(self, cfg: NodeConfig, ident: Identity) -> None:
        self.cfg = cfg
        self.ident = ident
        self.service = NetService(cfg, ident)
        self.faults = Faults(cfg.test_faults)
        if self.faults.enabled:
            log.warning("test_faults_enabled", spec=cfg.test_faults)
        self.data_spec: Any = None
        self.worker = Worker(cfg)
        svc = self.service
        svc.profile_fields["memory_mb"] = cfg.memory_mb
        if cfg.data:
            from snakenode.train import data as data_mod

            self.data_spec = data_mod.DataSpec.from_flags(cfg.data, cfg.partition, cfg.shard, cfg.seed)
            t0 = time.monotonic()
            svc.profile_fields["data"] = data_mod.stats(self.data_spec)
            log.info("data_loaded", dataset=self.data_spec.name, samples=svc.profile_fields["data"]["samples"],
                     seconds=round(time.monotonic() - t0, 3))
        cached = self._read_compute_cache()
        if cached is not None:
            svc.profile_fields["compute"] = self._scaled(cached)
        self.ctx = NodeContext(cfg, ident, svc, self.worker, self.faults, self.data_spec)
        self.snake = Snake(self.ctx)
        self._bench_until = 0.0
        svc.status_extra.append(self._status_extra)

    # --- compute score ------------------------------------------------------------------------
    def _cache_path(self) -> Path:
        return self.cfg.home / COMPUTE_CACHE

    def _read_compute_cache(self) -> dict[str, Any] | None:
        try:
            obj = json.loads(self._cache_path().read_text())
            if isinstance(obj.get("samples_per_s"), int | float) and obj["samples_per_s"] > 0:
                return {"samples_per_s": float(obj["samples_per_s"]), "workload": str(obj.get("workload", ""))}
        except (FileNotFoundError, json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            pass
        return None

    def _scaled(self, measured: dict[str, Any]) -> dict[str, Any]:
        return {"samples_per_s": round(measured["samples_per_s"] / self.cfg.compute_slowdown, 3),
                "workload": measured["workload"]}

    async def _measure_compute(self) -> None:
        if self._read_compute_cache() is not None:
            return
        t0 = time.monotonic()
        try:
            result = await self.worker.call("benchmark", {})
        except Exception as exc:  # noqa: BLE001 - the node still works; routing treats compute as unknown
            self.service.counters.add("error.compute_benchmark")
            log.warning("compute_benchmark_failed", error=f"{type(exc).__name__}: {exc}")
            return
        measured = {"samples_per_s": float(result["samples_per_s"]), "workload": str(result.get("workload", ""))}
        write_json_atomic(self._cache_path(), measured)
        self.service.profile_fields["compute"] = self._scaled(measured)
        self.service.profile_changed()
        log.info("compute_measured", samples_per_s=measured["samples_per_s"],
                 seconds=round(time.monotonic() - t0, 2))

    # --- lifecycle ----------------------------------------------------------------------------
    def _lane_host(self) -> str:
        """The lane listens where libp2p does: the one IP all listen addresses share, else every address."""
        hosts = set()
        for addr in self.cfg.listen:
            parts = addr.split("/")
            hosts.add(parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else "")
        host = hosts.pop() if len(hosts) == 1 else ""
        return host or "0.0.0.0"

    async def _start_lane(self, nursery: trio.Nursery) -> None:
        """The fast bulk lane's listener (docs/PROTOCOL.md, "Fast bulk lane"): its port goes into node.json
        and the profile as `lane_port`; with lane_port = -1 there is none (node.json: null)."""
        svc = self.service
        if self.cfg.lane_port < 0:
            svc.node_json_extra["lane_port"] = None
            log.info("lane_disabled")
            return
        server = LaneServer(svc.counters, host=self._lane_host(), port=self.cfg.lane_port)
        port = await nursery.start(server.serve)
        self.ctx.lane = server
        svc.node_json_extra["lane_port"] = port
        svc.profile_fields["lane_port"] = port
        svc.profile_changed()

    async def _start_http(self, nursery: trio.Nursery) -> None:
        """The read-only HTTP side (snakenode/http): it sees the node only through these callables, the
        same ones the control ops serve. node.json gets `http_url` (null with --http off)."""
        from snakenode.http import Sources, parse_address

        svc = self.service
        svc.node_json_extra["http_url"] = None
        if parse_address(self.cfg.http) is None:
            return
        from snakenode.http.lag import LagMonitor
        from snakenode.http.server import serve

        snake = self.snake
        sources = Sources(
            status=svc.status, peers=lambda: svc.table.view(time.monotonic()), jobs=snake.jobs_view,
            job=snake.job_detail, counters=svc.counters.snapshot,
            progress=lambda: {j: dict(r.last_metrics) for j, r in snake.jobs.items()
                              if r.phase == "training" and r.last_metrics})
        lag = LagMonitor()
        await nursery.start(lag.run)
        svc.node_json_extra["http_url"] = await nursery.start(serve, self.cfg.http, sources, lag, svc.peer_id)
        log.info("http_listening", url=svc.node_json_extra["http_url"])

    def _status_extra(self) -> dict[str, Any]:
        return {
            "worker": self.worker.status(),
            "snake": self.snake.status(),
            "jobs": len(self.snake.jobs),
            **({"schedule": self.snake.schedule()} if self.cfg.role == "coordinator" else {}),
            "data": self.cfg.data or None,
            "memory_budget_mb": self.cfg.memory_mb,
        }

    # --- control ops --------------------------------------------------------------------------
    async def _op_submit(self, args: Any) -> Any:
        return await self.snake.submit(args.bytes("job", 64 * 1024))

    async def _op_jobs(self, args: Any) -> Any:
        return self.snake.jobs_view()

    async def _op_job(self, args: Any) -> Any:
        job_id = self.snake.resolve(args.str("job_id", 64))
        if args.bool("collect", required=False):
            with trio.move_on_after(3):
                await self.snake.collect(job_id)
        return self.snake.job_detail(job_id, args.int("since", 0, 2**40, required=False))

    async def _op_fetch(self, args: Any) -> Any:
        out = args.str("out", 4096)
        if not os.path.isabs(out):
            raise ControlError("out must be an absolute path", "bad_request")
        return await self.snake.fetch(self.snake.resolve(args.str("job_id", 64)), out)

    async def _op_resume(self, args: Any) -> Any:
        return await self.snake.resume(self.snake.resolve(args.str("job_id", 64)))

    async def _op_reload_trust(self, args: Any) -> Any:
        from snakenode import config

        cfg = config.load(self.cfg.home, {})
        self.snake.set_extra_trusted(set(cfg.trusted_submitters))
        return {"trusted": sorted(self.snake.trusted())}

    async def _op_bench(self, args: Any) -> Any:
        """Re-measure compute for `seconds` in the worker (a CPU-heavy torch job), in the background."""
        seconds = args.float("seconds", 0.0, 3600.0, required=False, default=5.0)
        if seconds <= 0:
            if self.worker.busy and self._bench_until:
                await self.worker.cancel()
            return {"started": False}
        if self.worker.busy:
            raise ControlError("the worker is busy (training); try again when the node is idle", "busy")
        assert self.service.nursery is not None
        self.service.nursery.start_soon(self._bench, seconds)
        return {"started": True, "seconds": seconds}

    async def _bench(self, seconds: float) -> None:
        self._bench_until = time.monotonic() + seconds
        try:
            result = await self.worker.call("benchmark", {"seconds": seconds})
            measured = {"samples_per_s": float(result["samples_per_s"]), "workload": str(result.get("workload", ""))}
            write_json_atomic(self._cache_path(), measured)
            self.service.profile_fields["compute"] = self._scaled(measured)
            self.service.profile_changed()
        except Exception as exc:  # noqa: BLE001
            log.warning("bench_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._bench_until = 0.0

    async def _extra(self, nursery: trio.Nursery) -> None:
        self.service.register_ops({
            "submit": self._op_submit, "jobs": self._op_jobs, "job": self._op_job, "fetch": self._op_fetch,
            "resume": self._op_resume, "reload_trust": self._op_reload_trust, "bench": self._op_bench,
        })
        await self._start_lane(nursery)
        await nursery.start(self.snake.run)
        await self._start_http(nursery)
        if self.cfg.coordinator and self.service.discovery is not None:
            pid = self.cfg.coordinator.split("/p2p/")[-1]
            self.service.discovery.hint(pid, [self.cfg.coordinator])  # only helps to connect
        if self.faults.has("handler"):
            self.service.register_protocol(TEST_RAISE_PROTOCOL, "test-raise", self.faults.raising_handler)
        nursery.start_soon(self.worker.reaper)
        nursery.start_soon(self._measure_compute)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_service)
                task_status.started()
        finally:
            with trio.move_on_after(2, shield=True):
                await self.worker.aclose()

    async def _run_service(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.service.run(task_status, extra=self._extra)

    def cleanup(self) -> None:
        self.service.cleanup()
