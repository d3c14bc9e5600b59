"""Linux network namespaces as stand-in hosts: one namespace per host on a bridge, real separate IPs.

Each lab owns a "switch" namespace holding its bridge and, per host, a namespace with a veth pair (`eth0`
inside, the other end on the bridge in the switch). The bridge lives in a namespace of its own, not in the
root namespace, because bridged frames pass through the netfilter FORWARD chain of the namespace the bridge
is in whenever `net.bridge.bridge-nf-call-iptables` is 1: on a host with Docker installed (FORWARD policy
DROP, bridge netfilter on) a root-namespace bridge silently drops every frame between the lab's hosts. A
fresh namespace starts with an empty, accepting firewall, so the lab works whatever the host's firewall
says, and the host's firewall is never touched. Links can be cut (`link_down`/`link_up`) and shaped with `tc tbf`
(bandwidth; this kernel has no netem, so no added latency). Everything a lab creates is recorded in a
state file under STATE_DIR before it is created, so `cleanup_stale()` removes the leftovers of a lab
whose runner was killed (owner pid gone) — no namespace or veth is ever left behind for long.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = Path(os.environ.get("SNAKENODE_NETNS_STATE", "/run/snakenode-netns"))
WATCH_TICK_S = 1.0  # the watchdog notices a normal close (state file gone) this fast and exits


class NetnsError(Exception):
    pass


def available() -> tuple[bool, str]:
    """Whether this process can build labs; the reason when it cannot (for skips and refusals)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (run as root, or use the local backend)"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is missing: apt-get install iproute2"
    return True, ""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    veth_root: str
    index: int


@dataclass
class Lab:
    """A bridge plus namespaces. Use as a context manager; `close()` is idempotent."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    subnet: str = "10.231"
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ok, why = available()
        if not ok:
            raise NetnsError(why)
        cleanup_stale()
        self.bridge = f"snkb{self.tag}"
        self.switch = f"snk{self.tag}-sw"
        self.state_file = STATE_DIR / f"{self.tag}.json"
        self._closed = False
        self._save()
        self._watchdog = _start_watchdog(self.state_file)
        _run("ip", "netns", "add", self.switch)
        self._sw("link", "add", self.bridge, "type", "bridge")
        self._sw("link", "set", self.bridge, "up")

    def _sw(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """An `ip` command inside the switch namespace (the bridge and the hosts' outer veth ends)."""
        return _run("ip", "-n", self.switch, *args, check=check)

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({
            "owner": os.getpid(), "bridge": self.bridge, "switch": self.switch,
            "namespaces": [h.ns for h in self.hosts.values()],
        }))

    def add_host(self, name: str) -> Host:
        i = len(self.hosts) + 2
        if i > 250:
            raise NetnsError("a lab holds at most 249 hosts")
        host = Host(name=name, ns=f"snk{self.tag}-{i}", ip=f"{self.subnet}.0.{i}", veth_root=f"snk{self.tag}h{i}",
                    index=i)
        self.hosts[name] = host
        self._save()  # recorded before creation: a crash mid-way still gets cleaned up
        peer = f"snk{self.tag}c{i}"
        _run("ip", "netns", "add", host.ns)
        _run("ip", "-n", self.switch, "link", "add", host.veth_root, "type", "veth", "peer", "name", peer,
             "netns", host.ns)
        self._sw("link", "set", host.veth_root, "master", self.bridge, "up")
        _run("ip", "-n", host.ns, "link", "set", peer, "name", "eth0")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.ip}/16", "dev", "eth0")
        _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.ns, "link", "set", "lo", "up")
        return host

    def argv(self, name: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name].ns, *argv]

    def link_down(self, name: str) -> None:
        self._sw("link", "set", self.hosts[name].veth_root, "down")

    def link_up(self, name: str) -> None:
        self._sw("link", "set", self.hosts[name].veth_root, "up")

    def partition(self, group_a: list[str], group_b: list[str]) -> None:
        """Cut traffic between two groups (both stay reachable within their group) with a second bridge."""
        side = f"snkp{self.tag}"
        self._sw("link", "add", side, "type", "bridge", check=False)
        self._sw("link", "set", side, "up")
        for name in group_b:
            self._sw("link", "set", self.hosts[name].veth_root, "master", side)
        self.partition_bridge = side

    def heal(self) -> None:
        for host in self.hosts.values():
            self._sw("link", "set", host.veth_root, "master", self.bridge)
        side = getattr(self, "partition_bridge", None)
        if side:
            self._sw("link", "del", side, check=False)
            self.partition_bridge = None

    def verify(self, timeout_s: float = 2.0) -> None:
        """Fail within seconds, naming the cause, when the first host cannot reach every other one.

        A TCP connection to a closed port is answered at once with a reset when the path works, and times
        out when something drops frames; no listener and no ping binary are needed."""
        names = list(self.hosts)
        if len(names) < 2:
            return
        first, others = self.hosts[names[0]], [self.hosts[n] for n in names[1:]]
        probe = ("import socket,sys\n"
                 "bad=[]\n"
                 "for ip in sys.argv[2:]:\n"
                 "    s=socket.socket(); s.settimeout(float(sys.argv[1]))\n"
                 "    try: s.connect((ip, 9))\n"
                 "    except ConnectionRefusedError: pass\n"
                 "    except OSError: bad.append(ip)\n"
                 "    finally: s.close()\n"
                 "print(' '.join(bad))\n")
        r = _run(*self.argv(first.name, [sys.executable, "-c", probe, str(timeout_s), *[h.ip for h in others]]))
        lost = r.stdout.split()
        if lost:
            unreachable = [h.name for h in others if h.ip in lost]
            raise NetnsError(f"lab host {first.name} cannot reach {', '.join(unreachable)} across the lab's bridge "
                             f"({self.bridge} in namespace {self.switch}): {self._diagnose()}")

    def _diagnose(self) -> str:
        """What in the switch namespace can drop bridged frames (its bridge netfilter setting and firewall)."""
        nf = _run("ip", "netns", "exec", self.switch, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
                  check=False).stdout.strip() or "not loaded"
        fw = "iptables is not installed"
        if shutil.which("iptables"):
            fw = _run("ip", "netns", "exec", self.switch, "iptables", "-S", "FORWARD", check=False).stdout
            fw = "; ".join(line for line in fw.splitlines() if line) or "no FORWARD rules"
        return (f"bridge-nf-call-iptables={nf}, FORWARD chain: {fw}. Frames between lab hosts are filtered by "
                f"that namespace's FORWARD chain when bridge netfilter is on: check "
                f"`ip netns exec {self.switch} iptables -S` and its nft ruleset, and that the veths are up")

    def link_counters(self) -> dict[str, tuple[int, int]]:
        """(rx, tx) of every host's eth0 in one call, read on the switch side of its veth pair (swapped there)."""
        rows = json.loads(self._sw("-j", "-s", "link", "show").stdout or "[]")
        by_veth = {row.get("ifname"): row.get("stats64", {}) for row in rows}
        out = {}
        for name, host in self.hosts.items():
            stats = by_veth.get(host.veth_root)
            if stats:
                out[name] = (int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"]))
        return out

    def set_rate(self, name: str, rate: str | None) -> None:
        """Egress bandwidth of a host (e.g. "1mbit"); None removes the limit. Applied inside its namespace."""
        ns = self.hosts[name].ns
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        if rate:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                 "burst", "32kbit", "latency", "400ms")

    def counters(self, name: str) -> dict[str, int]:
        """Bytes through the host's eth0 (its side of the link): what the host sent and received."""
        ns = self.hosts[name].ns
        out = {}
        for key in ("rx_bytes", "tx_bytes"):
            r = _run("ip", "netns", "exec", ns, "cat", f"/sys/class/net/eth0/statistics/{key}")
            out[key] = int(r.stdout.strip())
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _teardown({"bridge": self.bridge, "switch": self.switch, "namespaces": [h.ns for h in self.hosts.values()]})
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=WATCH_TICK_S * 3)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_ns_processes(ns: str) -> None:
    r = _run("ip", "netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def _teardown(state: dict[str, object]) -> None:
    """Remove a lab; deleting the switch namespace removes its bridges and the outer veth ends with it.

    State files written before the switch namespace existed name root-namespace veths and bridges; those
    are removed too."""
    for ns in state.get("namespaces", []) or []:  # type: ignore[union-attr]
        _kill_ns_processes(str(ns))
        _run("ip", "netns", "del", str(ns), check=False)
    if state.get("switch"):
        _run("ip", "netns", "del", str(state["switch"]), check=False)
        return
    for veth in state.get("veths", []) or []:  # type: ignore[union-attr]
        _run("ip", "link", "del", str(veth), check=False)
    for br in [state.get("bridge"), *(state.get("extra_bridges", []) or [])]:  # type: ignore[misc]
        if br:
            _run("ip", "link", "del", str(br), check=False)
    tag = str(state.get("bridge", ""))[4:]
    if tag:
        _run("ip", "link", "del", f"snkp{tag}", check=False)


def cleanup_stale() -> list[str]:
    """Tear down labs whose owner process is gone (a killed runner); returns their tags."""
    removed = []
    if not STATE_DIR.exists():
        return removed
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
            owner = int(state.get("owner", 0))
        except (json.JSONDecodeError, OSError, ValueError):
            continue
        alive = True
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            _teardown(state)
            path.unlink(missing_ok=True)
            removed.append(path.stem)
    return removed


def tc_rate(bytes_per_s: float) -> str:
    """A tc rate from bytes per second (tc's own "kbps" means kilobytes: bits per second avoid the trap)."""
    return f"{max(8, int(bytes_per_s * 8))}bit"


def _start_watchdog(state_file: Path) -> subprocess.Popen[bytes] | None:
    """A separate process that tears the lab down if its owner dies without closing it (even by SIGKILL).

    It runs in its own session, so a signal to the owner's process group does not reach it."""
    try:
        return subprocess.Popen([sys.executable, "-m", "scenarios.netns", "--watch", str(os.getpid()),
                                 str(state_file)], start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=Path(__file__).resolve().parents[1])
    except OSError:
        return None  # cleanup_stale() at the next lab still removes the leftovers


def watch(owner: int, state_file: Path) -> int:
    """Wait for `owner` to exit; if its lab's state file is still there, tear the lab down."""
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while state_file.exists() and not poller.poll(WATCH_TICK_S * 1000):
            pass
        os.close(fd)
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return 1
        if int(state.get("owner", 0)) == owner:
            _teardown(state)
            state_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watch":
        sys.exit(watch(int(sys.argv[2]), Path(sys.argv[3])))
    print("usage: python -m scenarios.netns --watch OWNER_PID STATE_FILE", file=sys.stderr)
    sys.exit(2)
