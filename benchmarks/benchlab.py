"""Measurement plumbing shared by vs_flower.py and scale.py: processes in network namespaces, a sampler of
link bytes and process-tree memory, and small statistics.

Bytes are read from the root-namespace end of each host's veth pair (`/sys/class/net/<veth>/statistics`),
which sees exactly the frames of the host's `eth0` with rx and tx swapped, without forking `ip netns exec`
per read; that keeps a 5 Hz sampler cheap on a 2-core machine. `Lab.counters()` (the namespace side) is
used at the start and end of every window as a cross-check.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scenarios import netns  # noqa: E402

POLL_S = 0.05
MiB = 2**20


class BenchError(RuntimeError):
    """A benchmark step that failed; the message names the step and where its logs are."""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] | None = None) -> Any:
    """Poll `cond` until truthy; BenchError naming `what` (and the log tails) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except BenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - conditions may fail while processes start
            last = exc
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g} s waiting for {what}"
            if last is not None:
                msg += f" (last error: {type(last).__name__}: {last})"
            if logs is not None:
                msg += "\n" + logs()
            raise BenchError(msg)
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    host: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            lines = []
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(lines)


@dataclass
class Cluster:
    """A lab plus the processes started in its namespaces; `close()` stops them all and removes the lab."""

    lab: netns.Lab
    root: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def add_hosts(self, names: list[str]) -> None:
        for n in names:
            self.lab.add_host(n)
        self.lab.verify()

    def ip(self, host: str) -> str:
        return self.lab.hosts[host].ip

    def start(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "ab") as f:
            p = subprocess.Popen(self.lab.argv(host, argv), stdout=f, stderr=subprocess.STDOUT, env=env,
                                 cwd=ROOT, start_new_session=True)
        proc = Proc(name, host, p, log)
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())

    def check_alive(self, names: list[str] | None = None) -> None:
        for p in self.procs.values():
            if (names is None or p.name in names) and not p.alive():
                raise BenchError(f"{p.name} exited with status {p.popen.returncode}\n{p.tail()}")

    def stop(self, names: list[str] | None = None, timeout: float = 8.0) -> None:
        """SIGTERM every process group, then SIGKILL whatever is left after `timeout` seconds."""
        chosen = [p for p in self.procs.values() if names is None or p.name in names]
        for p in chosen:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in chosen:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.lab.close()


@contextlib.contextmanager
def cluster(root: Path, hosts: list[str]) -> Iterator[Cluster]:
    root.mkdir(parents=True, exist_ok=True)
    lab = netns.Lab()
    c = Cluster(lab, root)
    try:
        c.add_hosts(hosts)
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------- measurements


def link_bytes(lab: netns.Lab, host: str) -> tuple[int, int]:
    """(rx, tx) of the host's eth0, read on the switch side of its veth pair (swapped there)."""
    return lab.link_counters()[host]


def all_link_bytes(lab: netns.Lab, hosts: list[str]) -> dict[str, tuple[int, int]]:
    """`link_bytes` for many hosts with one `ip` call (a sample of 64 hosts must not take 64 processes)."""
    counters = lab.link_counters()
    return {h: counters[h] for h in hosts}


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (a daemon and its worker; a SuperNode and
    its ClientApp processes)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.Error):
            total += q.memory_info().rss
    return total / MiB


@dataclass
class Sample:
    t: float
    links: dict[str, tuple[int, int]]       # host -> (rx, tx)
    rss: dict[str, float]                   # group -> MB


class Sampler:
    """A background thread taking a Sample every `period_s` seconds, plus optional per-tick hooks
    (e.g. archiving every hop's model before the node's store forgets it)."""

    def __init__(self, lab: netns.Lab, hosts: list[str], rss_pids: Callable[[], dict[str, int]],
                 period_s: float = 0.2, hooks: list[Callable[[], None]] | None = None) -> None:
        self.lab = lab
        self.hosts = hosts
        self.rss_pids = rss_pids
        self.period_s = period_s
        self.hooks = list(hooks or [])
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def take(self) -> Sample:
        """One reading now (callable from any thread; samples stay in time order)."""
        rss = {g: tree_rss_mb(pid) for g, pid in self.rss_pids().items()}
        with self._lock:
            links = all_link_bytes(self.lab, list(self.hosts))
            s = Sample(time.time(), links, rss)
            self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.take()
                for hook in self.hooks:
                    hook()
            except Exception as exc:  # noqa: BLE001 - one bad tick must not end the measurement
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.take()

    def peak_rss(self, t0: float, t1: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.samples:
            if t0 <= s.t <= t1:
                for g, v in s.rss.items():
                    out[g] = max(out.get(g, 0.0), v)
        return out

    def at(self, t: float) -> Sample:
        """The first sample taken at or after `t` (the last one if none is)."""
        times = [s.t for s in self.samples]
        i = bisect_left(times, t)
        return self.samples[min(i, len(self.samples) - 1)]


def traffic(a: Sample | dict[str, tuple[int, int]], b: Sample | dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Bytes between two readings: the total on the wire (every byte is sent by exactly one host, so the sum
    of tx over hosts counts each once) and per host rx+tx (what its link carried)."""
    la = a.links if isinstance(a, Sample) else a
    lb = b.links if isinstance(b, Sample) else b
    per_host = {h: (lb[h][0] - la[h][0]) + (lb[h][1] - la[h][1]) for h in la}
    total = sum(lb[h][1] - la[h][1] for h in la)
    busiest = max(per_host, key=lambda h: per_host[h])
    return {"total": total, "per_host": per_host, "busiest_host": busiest, "busiest_bytes": per_host[busiest]}


def machine() -> dict[str, Any]:
    import platform

    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def write_json(path: Path | None, doc: dict[str, Any]) -> None:
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    if path is None:
        print(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def linear_fit_through_origin(xs: list[float], ys: list[float]) -> float:
    """Least-squares c for y = c*x."""
    den = sum(x * x for x in xs)
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Growth exponent k in y ~ x^k (least squares on logs); 1 means linear growth."""
    import math

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")
