"""A snake network for integration tests: a bootstrap peer plus nodes that trust one submitter.

Identities are created before the nodes start (so every node can be told to trust the submitter), and
each home gets a cached compute score, so nodes do not all run the compute benchmark at once (2 cores).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from harness import Net, Proc, control, run_cli, wait_for

from snakenode import identity
from snakenode.snake import hoplog

REPO = Path(__file__).resolve().parents[1]


class SnakeNet:
    def __init__(self, root: Path, network: str = "snake", submitter: str = "n0") -> None:
        self.net = Net(root, network=network)
        self.root = root
        self.boot = self.net.start_bootstrap()
        self.boot.wait_ready()
        self.nodes: dict[str, Proc] = {}
        self.ids: dict[str, str] = {}
        self.submitter_name = submitter
        self.submitter = self.make_identity(submitter)
        self.coordinator: Proc | None = None

    def add_coordinator(self, name: str = "coord") -> Proc:
        """A coordinator peer (CS mode); it must be the submitter, so the nodes trust it."""
        assert self.submitter_name == name, "create the SnakeNet with submitter=<coordinator name>"
        proc = self.net.start_node(name, [self.boot.addr], data=None, extra=["--role", "coordinator"])
        self.nodes[name] = proc
        self.coordinator = proc
        proc.wait_ready()
        return proc

    def make_identity(self, name: str) -> str:
        home = self.net.home(name)
        pid = identity.load_or_create(home).peer_id
        (home / "cache").mkdir(parents=True, exist_ok=True)
        (home / "cache" / "compute.json").write_text(json.dumps({"samples_per_s": 50000.0, "workload": "test"}))
        self.ids[name] = pid
        return pid

    def add_node(self, name: str, shard: str, data: str = "digits", partition: str = "dirichlet:0.3",
                 extra: list[str] | None = None, seed: int = 0) -> Proc:
        if name not in self.ids:
            self.make_identity(name)
        args = ["--partition", partition, "--shard", shard, "--seed", str(seed), *(extra or [])]
        if self.ids[name] != self.submitter:
            args += ["--trust", self.submitter]
        if self.coordinator is not None and self.coordinator.alive():
            args += ["--coordinator", self.coordinator.addr]
        proc = self.net.start_node(name, [self.boot.addr], data=data, extra=args)
        self.nodes[name] = proc
        return proc

    def name_of(self, peer_id: str) -> str:
        return next((n for n, p in self.ids.items() if p == peer_id), peer_id[-8:])

    def wait_ready(self) -> None:
        for p in self.nodes.values():
            p.wait_ready()
        everyone = {p.peer_id for p in self.nodes.values()}

        def converged() -> bool:
            for p in self.nodes.values():
                seen = {r["peer_id"] for r in control(p.home, "peers", timeout=2)}
                if not everyone - {p.peer_id} <= seen:
                    return False
            return True

        self.net.wait(converged, 30, "every node to see every other")

    def submit(self, job_toml: str, name: str = "job.toml", home: str | None = None, mode: str | None = None) -> str:
        tomllib.loads(job_toml)
        path = self.root / name
        path.write_text(job_toml)
        extra = ["--mode", mode] if mode else []
        r = run_cli("submit", str(path), "--home", str(self.net.home(home or self.submitter_name)), *extra)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def detail(self, job_id: str, node: str | None = None) -> dict[str, Any]:
        return control(self.net.home(node or self.watcher()), "job", {"job_id": job_id, "collect": True}, timeout=8)

    def watcher(self) -> str:
        """A live node to ask about jobs (the submitter unless it is down)."""
        if self.nodes.get(self.submitter_name) is None or self.nodes[self.submitter_name].alive():
            return self.submitter_name
        return next(n for n, p in self.nodes.items() if p.alive())

    def wait_complete(self, job_id: str, timeout: float, node: str | None = None) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            d = self.detail(job_id, node)
            return d if d["summary"]["status"] == "complete" else None

        return self.net.wait(done, timeout, f"job {job_id} to complete")

    def merged_records(self, job_id: str) -> list[dict[str, Any]]:
        """Every live node's hop log (own events and what it heard), merged."""
        logs = []
        for p in self.nodes.values():
            if p.alive():
                try:
                    logs.append(control(p.home, "job", {"job_id": job_id}, timeout=5)["records"])
                except Exception:  # noqa: BLE001 - a node that never heard of the job
                    continue
        for p in self.nodes.values():  # dead nodes' own logs are on disk
            for f in ("hoplog.jsonl",):
                path = p.home / "jobs" / job_id / f
                if path.exists():
                    logs.append(hoplog.read_log(path))
        return hoplog.merge(*logs)

    def close(self) -> None:
        self.net.close()


def job_toml(laps: int = 3, epochs: int = 4, drop_after_s: float = 30, max_declines: int = 3,
             extra: str = "", name: str = "test-job", model: str = "mlp", dataset: str = "digits",
             max_blocks: int = 2) -> str:
    return f'''name = "{name}"
model = "{model}"
dataset = "{dataset}"
laps = {laps}
seed = 0
[train]
epochs = {epochs}
batch = 32
lr = 0.05
optimizer = "sgd"
momentum = 0.9
[kd]
mode = "auto"
[window]
min_blocks = 1
max_blocks = {max_blocks}
[lap]
drop_after_s = {drop_after_s}
max_declines = {max_declines}
{extra}
'''


def laps_holders(records: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Holders of the surviving lineage's trained hops, per lap."""
    out: dict[int, list[str]] = {}
    for group in hoplog.surviving_chain(records):
        for r in group:
            if r["event"] == "trained":
                out.setdefault(r["lap"], []).append(r["holder"])
    return out


def wait_event(sn: SnakeNet, job_id: str, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for r in sn.detail(job_id)["records"]:
            if pred(r):
                return r
        return None

    return wait_for(find, timeout, what, sn.net.logs)
