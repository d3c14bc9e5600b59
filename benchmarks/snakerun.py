"""A snakenode network in a lab, driven the way a user drives it: a bootstrap peer and N nodes started with
`snakenode start` in their own namespaces (product defaults for liveness and gossip), a job submitted on
node 0 through its control socket (what `snakenode submit` does), progress read from the merged hop log.

Accuracy over time: the product logs each hop's validation metric on the holder's own (skewed) holdout,
not test accuracy, and a node's layer store forgets a hop's layers once the baton is released. So while a
job runs, `HopArchive` watches every node's `checkpoint.json` (which names the model a node holds after
training its hop) and hard-links those layer blobs into an archive store before they can be collected;
afterwards every hop's model is evaluated on the fixed test split with the engine's own `evaluate`. The
product is not changed and pays nothing for this (a hard link per new layer, read-only file polls).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlab import BenchError, Cluster, wait_for

from snakenode import control, identity
from snakenode.snake import hoplog
from snakenode.snake import job as job_mod

PY = sys.executable
PORT = 4001
FINISHED_PHASES = ("trained", "handing_off", "baton", "done")


@dataclass
class SnakeNet:
    cluster: Cluster
    network: str
    nodes: list[str]                                  # host names of the training nodes
    homes: dict[str, Path] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    boot: str = "boot"
    coordinator: str | None = None                    # CS mode: the host of the coordinator peer

    @property
    def submitter(self) -> str:
        return self.coordinator or self.nodes[0]

    @property
    def daemons(self) -> list[str]:
        return ([self.coordinator] if self.coordinator else []) + self.nodes

    def start(self, data: str, partition: str, seed: int = 0, extra: list[str] | None = None,
              ready_timeout: float = 120.0) -> None:
        """Bootstrap first (its address is every node's --bootstrap), then the nodes; node 0's key is the
        submitter every other node trusts."""
        c = self.cluster
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SNAKENODE_HOME", None)
        for h in [self.boot, *self.daemons]:
            self.homes[h] = c.root / h
            self.homes[h].mkdir(parents=True, exist_ok=True)
        boot = c.start(self.boot, self.boot, [PY, "-m", "bootstrap", "--home", str(self.homes[self.boot]),
                                              "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--network", self.network], env)
        info = self._wait_node_json(self.boot, boot.popen.pid, ready_timeout)
        ip = c.ip(self.boot)
        addrs = [a for a in info["addrs"] if f"/ip4/{ip}/" in a]
        if not addrs:
            raise BenchError(f"the bootstrap peer does not advertise its namespace address {ip}: {info['addrs']}")
        boot_addr = addrs[0]
        for h in self.daemons:
            self.ids[h] = identity.load_or_create(self.homes[h]).peer_id
        coord_args: list[str] = []
        if self.coordinator:
            h = self.coordinator
            c.start(h, h, [PY, "-m", "snakenode.cli", "start", "--home", str(self.homes[h]), "--role", "coordinator",
                           "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--network", self.network, "--bootstrap",
                           boot_addr], env)
            cinfo = self._wait_node_json(h, c.procs[h].popen.pid, ready_timeout)
            coord_args = ["--coordinator", next(a for a in cinfo["addrs"] if f"/ip4/{c.ip(h)}/" in a)]
        n = len(self.nodes)
        for i, h in enumerate(self.nodes):
            argv = [PY, "-m", "snakenode.cli", "start", "--home", str(self.homes[h]), "--listen",
                    f"/ip4/0.0.0.0/tcp/{PORT}", "--network", self.network, "--bootstrap", boot_addr,
                    "--data", data, "--partition", partition, "--shard", f"{i}/{n}", "--seed", str(seed)]
            if h != self.submitter:
                argv += ["--trust", self.ids[self.submitter]]
            c.start(h, h, argv + coord_args + list(extra or []), env)
        for h in self.nodes:
            self._wait_node_json(h, c.procs[h].popen.pid, ready_timeout)

    def _wait_node_json(self, h: str, pid: int, timeout: float) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            self.cluster.check_alive([h])
            try:
                info = json.loads((self.homes[h] / "node.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return info if info.get("pid") == pid else None

        return wait_for(ready, timeout, f"{h} to write node.json", self.cluster.logs)

    def pids(self) -> dict[str, int]:
        return {h: self.cluster.procs[h].popen.pid for h in [self.boot, *self.daemons] if h in self.cluster.procs}

    def knows_everyone(self, need_compute: bool = False) -> bool:
        """Every node has every other node's profile (and, if asked, its measured compute score)."""
        everyone = set(self.ids.values())
        for h in self.daemons:
            rows = control.call(self.homes[h], "peers", timeout=5)
            seen = {r["peer_id"] for r in rows if r.get("profile")
                    and (not need_compute or (r["profile"].get("compute") or {}).get("samples_per_s"))}
            if not (everyone - {self.ids[h]}) <= seen:
                return False
        return True

    def live_peers(self, h: str) -> list[dict[str, Any]]:
        try:
            return list(control.call(self.homes[h], "peers", timeout=5))
        except Exception:  # noqa: BLE001 - a node that does not answer sees nobody, for this count
            return []

    def wait_converged(self, timeout: float, need_compute: bool = False) -> float:
        t0 = time.monotonic()
        wait_for(lambda: self.cluster.check_alive() or self.knows_everyone(need_compute), timeout,
                 "every node to know every other node's profile", self.cluster.logs)
        return time.monotonic() - t0

    def status(self, h: str) -> dict[str, Any]:
        return control.call(self.homes[h], "status", timeout=5)

    def submit(self, spec: dict[str, Any]) -> str:
        if self.coordinator:
            spec = job_mod.with_mode(spec, "cs", self.ids[self.coordinator])
        signed = job_mod.sign_job(spec, identity.load(self.homes[self.submitter]))
        res = control.call(self.homes[self.submitter], "submit", {"job": signed.encode()}, timeout=10)
        return str(res["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return control.call(self.homes[self.submitter], "job", {"job_id": job_id}, timeout=10)

    def own_records(self, job_id: str) -> list[dict[str, Any]]:
        """Every node's own hop log (HOME/jobs/<job>/hoplog.jsonl), merged. Unlike the submitter's merged
        view, this does not depend on the best-effort progress gossip having delivered every record."""
        logs = []
        for h in self.daemons:
            path = self.homes[h] / "jobs" / job_id / "hoplog.jsonl"
            if path.exists():
                logs.append(hoplog.read_log(path))
        return hoplog.merge(*logs)

    def wait_complete(self, job_id: str, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            self.cluster.check_alive()
            d = self.job(job_id)
            return d if d["summary"]["status"] == "complete" else None

        return wait_for(done, timeout, f"job {job_id} to complete", self.cluster.logs)


class HopArchive:
    """Keeps every finished hop's model: (hop, attempt, lineage) -> {layer: hash}, blobs hard-linked into
    `root/blobs` (a LayerStore layout) the first time a node's checkpoint names them."""

    def __init__(self, net: SnakeNet, root: Path) -> None:
        self.net = net
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.job_id: str | None = None
        self.models: dict[tuple[int, int, str], dict[str, str]] = {}
        self.missing: list[str] = []
        self._mtimes: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, period_s: float = 0.05) -> HopArchive:
        """Poll in a thread of its own: a hop on a small model can finish and be released in ~0.3 s, and a
        finished checkpoint lasts only until the baton is released (one stat per node per tick)."""
        def loop() -> None:
            while not self._stop.wait(period_s):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001, S110 - a torn read is retried on the next tick
                    pass
        self._thread = threading.Thread(target=loop, name="hop-archive", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.poll()

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        if self.job_id is None:
            return
        for h in self.net.daemons:
            home = self.net.homes[h]
            cp = home / "jobs" / self.job_id / "checkpoint.json"
            try:
                m = cp.stat().st_mtime_ns
                if self._mtimes.get(h) == m:
                    continue
                doc = json.loads(cp.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            self._mtimes[h] = m
            st = doc.get("state") or {}
            if doc.get("phase") not in FINISHED_PHASES or not st.get("finished"):
                continue
            key = (int(st["hop"]), int(st["attempt"]), str(st["lineage"]))
            if key in self.models:
                continue
            model = dict(doc.get("model") or {})
            for digest in model.values():
                dst = self.blobs / f"{digest}.safetensors"
                if dst.exists():
                    continue
                try:
                    os.link(home / "store" / "blobs" / f"{digest}.safetensors", dst)
                except FileNotFoundError:
                    self.missing.append(f"{h}:{digest[:12]}")
                except FileExistsError:
                    pass
            self.models[key] = model


def trained_hops(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `trained` records of the surviving lineage, in hop order."""
    groups = hoplog.surviving_chain(records)
    hops = [r for g in groups for r in g if r["event"] == "trained"]
    return sorted(hops, key=lambda r: r["hop"])


def evaluate_hops(spec: dict[str, Any], archive: HopArchive, hops: list[dict[str, Any]], dataset: str
                  ) -> list[dict[str, Any]]:
    """Test accuracy of every hop's model, with the engine's own evaluate (as `job_complete` computes it)."""
    from snakenode.layers.store import LayerStore
    from snakenode.train.engine import Engine

    engine = Engine(LayerStore(archive.root))
    data = {"name": dataset, "path": None, "partition": "iid", "shard_index": 0, "shard_count": 1, "seed": 0}
    out = []
    for r in hops:
        model = archive.models.get((r["hop"], r["attempt"], r["lineage"]))
        if model is None:
            raise BenchError(f"hop {r['hop']} (attempt {r['attempt']}) was never seen in a checkpoint; "
                             "the archive cannot evaluate it")
        m = engine.evaluate(spec, model, data, "test")
        out.append({"hop": r["hop"], "lap": r["lap"], "holder": r["holder"], "t": r["t_train_end"],
                    "window": r["window"], "accuracy": m["accuracy"], "loss": m["loss"]})
    return out
