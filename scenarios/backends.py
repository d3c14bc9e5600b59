"""Where a scenario's hosts run: `local` (processes on 127.0.0.1) and `netns` (one network namespace per
host on a bridge). The compose backend lives in compose.py. The runner drives every backend through the
same small interface (start, kill, stop, leave, partition, ...); hop logs are read from the hosts' homes.

Bandwidth: the netns backend shapes each host's egress with `tc ... tbf` (all traffic); the local backend
has one shared loopback, so it uses the nodes' test-only bundle send limit (`--test-faults rate=...`), which
slows bundle transfers only. Neither adds latency: this kernel has no netem, and a fake delay would lie.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from scenarios import netns
from scenarios.procs import PY, Proc, wait_for
from scenarios.spec import Host, Scenario

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0  # a node imports libp2p (~1 s) and binds; 2 busy cores can make that slow
CONTROL_TIMEOUT_S = 2.0


class Refused(Exception):
    """This backend cannot run this scenario here; the message says why and what to do instead."""


class Backend:
    """Common interface; subclasses start processes, shape links and cut them."""

    name = ""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.scenario = scenario
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.log_dir = workdir / "logs"

    # --- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def refusal(cls, scenario: Scenario) -> str | None:
        """Why this backend cannot run `scenario` here (None: it can)."""
        return None

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- hosts -----------------------------------------------------------------------------------
    def home(self, name: str) -> Path:
        return self.run_dir / name

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start_host(self, host: Host, trusted: list[str], hooks: tuple[str, ...]) -> None:
        raise NotImplementedError

    def start_bootstrap(self) -> None:
        """Start the bootstrap peer again (same home, so the same identity and address) and wait until ready."""
        raise NotImplementedError

    def wait_ready(self, name: str, timeout: float = READY_TIMEOUT_S) -> None:
        raise NotImplementedError

    def alive(self, name: str) -> bool:
        raise NotImplementedError

    def stopped(self, name: str) -> bool:
        raise NotImplementedError

    def control(self, name: str, op: str, args: dict[str, Any] | None = None,
                timeout: float = CONTROL_TIMEOUT_S) -> Any:
        from snakenode import control

        return control.call(self.home(name), op, args, timeout=timeout)

    def submit(self, name: str, job_file: Path) -> dict[str, Any]:
        r = subprocess.run([PY, "-m", "snakenode.cli", "submit", str(job_file), "--home", str(self.home(name)),
                            "--json"], capture_output=True, text=True, timeout=60, cwd=REPO, env=self.env())
        if r.returncode != 0:
            raise RuntimeError(f"snakenode submit on {name} failed ({r.returncode}): {r.stderr.strip()}")
        return dict(json.loads(r.stdout))

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SNAKENODE_HOME", None)
        env.pop("SNAKENODE_TEST_FAULTS", None)
        return env

    # --- faults ----------------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        raise NotImplementedError

    def stop(self, name: str) -> None:
        raise NotImplementedError

    def cont(self, name: str) -> None:
        raise NotImplementedError

    def leave(self, name: str) -> None:
        raise NotImplementedError

    def partition(self, groups: tuple[tuple[str, ...], ...]) -> None:
        raise Refused(f"the {self.name} backend cannot cut links")

    def heal(self) -> None:
        raise Refused(f"the {self.name} backend cannot cut links")

    def link(self, name: str, up: bool) -> None:
        raise Refused(f"the {self.name} backend cannot cut links")

    def throttle(self, name: str, bps: float | None) -> None:
        raise Refused(f"the {self.name} backend cannot change bandwidth at run time")


def free_port() -> int:
    """A TCP port free now, below the kernel's ephemeral range (32768+), so that outgoing connections made
    while the bootstrap peer is down cannot take it before it restarts."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-32000 for the bootstrap peer")


def node_flags(host: Host, trusted: list[str], hooks: tuple[str, ...], rate_hook: bool) -> list[str]:
    """`snakenode start` flags for a host (without --home/--listen/--bootstrap/--network)."""
    flags: list[str] = []
    if host.role != "node":
        flags += ["--role", host.role]
    if host.data:
        flags += ["--data", host.data, "--partition", host.partition, "--shard", host.shard,
                  "--seed", str(host.seed)]
    if host.memory_mb:
        flags += ["--memory-budget", str(host.memory_mb)]
    if host.compute_slowdown != 1.0:
        flags += ["--compute-slowdown", f"{host.compute_slowdown:g}"]
    for pid in trusted:
        flags += ["--trust", pid]
    spec = test_faults(host, hooks, rate_hook)
    if spec:
        flags += ["--test-faults", spec]
    return flags


def test_faults(host: Host, hooks: tuple[str, ...], rate_hook: bool) -> str:
    """The host's --test-faults value: its phase hooks, plus its bandwidth as the bundle send limit when the
    backend cannot shape links (local, compose)."""
    items = list(hooks)
    if rate_hook and host.bandwidth_bps:
        items.insert(0, f"rate={host.bandwidth_bps:.0f}B/s")
    return ";".join(items)


class ProcessBackend(Backend):
    """Hosts are processes of this machine; subclasses say how they are wrapped and addressed."""

    listen = "/ip4/127.0.0.1/tcp/0"
    rate_hook = True

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        super().__init__(scenario, workdir)
        self.procs: dict[str, Proc] = {}
        self.boot_addr = ""

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        return argv

    def _proc(self, name: str, argv: list[str]) -> Proc:
        proc = self.procs.get(name)
        if proc is None:
            proc = Proc(name, self.home(name), self.wrap(name, argv), self.log_path(name), self.env(), REPO)
            self.procs[name] = proc
        return proc

    def _boot_addr(self, info: dict[str, Any]) -> str:
        return str(info["addrs"][0])

    def _boot_listen(self) -> str:
        """Where the bootstrap peer listens: fixed for the whole run, so a restarted one is found again."""
        return self.listen

    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        boot = self._proc("bootstrap", [PY, "-m", "bootstrap", "--home", str(self.home("bootstrap")),
                                        "--listen", self._boot_listen(), "--network", self.scenario.network])
        boot.start()
        self.boot_addr = self._boot_addr(boot.wait_ready(READY_TIMEOUT_S))

    def start_bootstrap(self) -> None:
        boot = self.procs["bootstrap"]
        if not boot.alive():
            boot.start()
        boot.wait_ready(READY_TIMEOUT_S)

    def _node_addr(self, name: str, info: dict[str, Any]) -> str | None:
        """The address other hosts reach this host on (the loopback one here)."""
        return next((str(a) for a in info.get("addrs", []) if "/ip4/127.0.0.1/" in a), None)

    def _also_bootstrap(self, name: str) -> list[str]:
        """Two running hosts' addresses, given as further bootstrap peers to a host that starts late, as a user
        lists several: a node that starts while the bootstrap peer is down still joins through them."""
        out = []
        for other, proc in self.procs.items():
            if other in ("bootstrap", name) or not proc.alive() or proc.stopped:
                continue
            info = proc.node_json()
            addr = self._node_addr(other, info) if info else None
            if addr:
                out.append(addr)
            if len(out) == 2:
                break
        return out

    def start_host(self, host: Host, trusted: list[str], hooks: tuple[str, ...]) -> None:
        boots = [self.boot_addr, *self._also_bootstrap(host.name)]
        argv = [PY, "-m", "snakenode.cli", "start", "--home", str(self.home(host.name)), "--listen", self.listen,
                "--network", self.scenario.network, *[a for b in boots for a in ("--bootstrap", b)],
                *node_flags(host, trusted, hooks, self.rate_hook)]
        proc = self.procs.get(host.name)
        if proc is not None:
            proc.argv = self.wrap(host.name, argv)  # hooks that already fired are not re-armed
        self._proc(host.name, argv).start()

    def wait_ready(self, name: str, timeout: float = READY_TIMEOUT_S) -> None:
        self.procs[name].wait_ready(timeout)

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.alive()

    def stopped(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.alive() and p.stopped

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def stop(self, name: str) -> None:
        self.procs[name].stop()

    def cont(self, name: str) -> None:
        self.procs[name].cont()

    def leave(self, name: str) -> None:
        self.procs[name].leave()

    def close(self) -> None:
        for p in self.procs.values():
            p.kill()

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())


class LocalBackend(ProcessBackend):
    name = "local"

    def _boot_listen(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{free_port()}"

    @classmethod
    def refusal(cls, scenario: Scenario) -> str | None:
        needs = scenario.needs_links
        if needs:
            return (f"{', '.join(needs)} need real links, which processes sharing 127.0.0.1 do not have: "
                    f"run with --backend netns (as root) or --backend compose")
        return None


class NetnsBackend(ProcessBackend):
    """One namespace per host (the bootstrap peer too) on a bridge; real IPs, tc shaping, cut links."""

    name = "netns"
    listen = "/ip4/0.0.0.0/tcp/4001"
    rate_hook = False

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        super().__init__(scenario, workdir)
        self.lab: netns.Lab | None = None

    @classmethod
    def refusal(cls, scenario: Scenario) -> str | None:
        ok, why = netns.available()
        return None if ok else why

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        assert self.lab is not None
        return self.lab.argv(name, argv)

    def _boot_addr(self, info: dict[str, Any]) -> str:
        assert self.lab is not None
        ip = self.lab.hosts["bootstrap"].ip
        addrs = [a for a in info["addrs"] if f"/ip4/{ip}/" in a]
        if not addrs:
            raise RuntimeError(f"the bootstrap peer does not advertise its namespace address {ip}: {info['addrs']}")
        return str(addrs[0])

    def open(self) -> None:
        self.lab = netns.Lab()
        self.lab.add_host("bootstrap")
        for h in self.scenario.hosts:
            self.lab.add_host(h.name)
            if h.bandwidth_bps:
                self.lab.set_rate(h.name, netns.tc_rate(h.bandwidth_bps))
        self.lab.verify()  # a lab whose hosts cannot reach each other fails now, with the cause, not in 90 s
        super().open()

    def ip(self, name: str) -> str:
        assert self.lab is not None
        return self.lab.hosts[name].ip

    def _node_addr(self, name: str, info: dict[str, Any]) -> str | None:
        assert self.lab is not None
        ip = self.lab.hosts[name].ip
        return next((str(a) for a in info.get("addrs", []) if f"/ip4/{ip}/" in a), None)

    def partition(self, groups: tuple[tuple[str, ...], ...]) -> None:
        assert self.lab is not None
        a, b = groups
        if "bootstrap" in b:  # the bootstrap stays on the main bridge: swap sides rather than move it
            a, b = b, a
        self.lab.partition(list(a), list(b))

    def heal(self) -> None:
        assert self.lab is not None
        self.lab.heal()

    def link(self, name: str, up: bool) -> None:
        assert self.lab is not None
        (self.lab.link_up if up else self.lab.link_down)(name)

    def throttle(self, name: str, bps: float | None) -> None:
        assert self.lab is not None
        self.lab.set_rate(name, netns.tc_rate(bps) if bps else None)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.lab is not None:
                self.lab.close()

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes through each host's link (the kernel's count, every protocol included)."""
        assert self.lab is not None
        out = {}
        for name in self.lab.hosts:
            try:
                out[name] = self.lab.counters(name)
            except netns.NetnsError:
                continue
        return out


__all__ = ["Backend", "LocalBackend", "NetnsBackend", "Refused", "node_flags", "test_faults", "wait_for"]
