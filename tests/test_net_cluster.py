"""Issue 2 on one shared network: 1 bootstrap + 5 nodes as real processes on 127.0.0.1.

Tests run in file order against the same network; each one first brings every process back up and waits
for full convergence, so a failure in one does not cascade.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Net, control, peer_ids, run_cli, wait_for

N_NODES = 5
# A killed peer's connection closes and the disconnect notifee drops it: documented ~0.3 s (0.22-0.29 s seen,
# also with the observer's worker saturating both cores); +0.7 s for polling every observer's table over its
# control socket on a loaded 2-core machine.
KILL_BOUND_S = 1.0
# A frozen peer is dropped after `ping_misses` (2) consecutive pings of `ping_interval_s` (1 s) go unanswered
# for `ping_timeout_s` (1.5 s): at worst 1 + 1.5 + 1 + 1.5 s after its last answer, plus a 0.25 s watch tick
# = 4.75 s (3.2-4.7 s seen); +0.75 s for polling the tables under load.
FREEZE_BOUND_S = 5.5


class Cluster:
    def __init__(self, root: Path) -> None:
        self.net = Net(root, network="cluster")
        self.boot = self.net.start_bootstrap()
        self.boot.wait_ready()
        self.boot_addr = self.boot.addr
        self.nodes = []
        for i in range(N_NODES):
            # n0 observes while its worker trains: give it two torch threads so it saturates both cores.
            env = {"SNAKENODE_WORKER_THREADS": "2"} if i == 0 else None
            self.nodes.append(self.net.start_node(
                f"n{i}", [self.boot_addr], data="digits",
                extra=["--partition", "dirichlet:0.3", "--shard", f"{i}/{N_NODES}", "--seed", "7"], env=env))
        for n in self.nodes:
            n.wait_ready()

    def all_ids(self) -> set[str]:
        return {p.peer_id for p in [self.boot, *self.nodes]}

    def converged(self) -> bool:
        everyone = self.all_ids()
        names = {p.peer_id: p.name for p in [self.boot, *self.nodes]}
        for p in [self.boot, *self.nodes]:
            seen = peer_ids(p.home)
            if seen != everyone - {p.peer_id}:
                missing = sorted(names.get(x, x) for x in everyone - {p.peer_id} - seen)
                extra = sorted(names.get(x, x) for x in seen - everyone)
                self.why = f"{p.name} misses {missing} and has extra {extra}"
                table = control(p.home, "peers", {"all": True})
                self.why += "\n" + "\n".join(f"  {names.get(r['peer_id'], r['peer_id'])}: {r}" for r in table)
                return False
        return True

    def ensure_up(self, timeout: float = 30) -> None:
        for p in [self.boot, *self.nodes]:
            if not p.alive():
                p.start()
                p.wait_ready()
            p.signal(signal.SIGCONT)
        self.wait_converged(timeout, "every peer table to list every other peer")

    def wait_converged(self, timeout: float, what: str) -> None:
        try:
            self.net.wait(self.converged, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{getattr(self, 'why', '')}\n{exc}") from None

    def observers(self, exclude: object) -> list:
        return [p for p in [self.boot, *self.nodes] if p is not exclude]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.net.close()


def time_until_gone(c: Cluster, victim_id: str, observers: list, bound: float) -> float:
    t0 = time.monotonic()

    def gone() -> bool:
        return all(victim_id not in peer_ids(o.home) for o in observers)

    c.net.wait(gone, bound + 2.0, f"{victim_id[-8:]} to leave every peer table")
    return time.monotonic() - t0


@pytest.mark.timeout(90)
def test_five_nodes_converge_with_profiles(cluster: Cluster) -> None:
    t0 = time.monotonic()
    cluster.ensure_up(timeout=30)
    elapsed = time.monotonic() - t0
    print(f"\n5 nodes + bootstrap converged {elapsed:.2f} s after the last node.json")
    rows = control(cluster.nodes[0].home, "peers")
    nodes = [r for r in rows if r["role"] == "node"]
    assert len(nodes) == N_NODES - 1
    boot = [r for r in rows if r["role"] == "bootstrap"]
    assert len(boot) == 1 and boot[0]["peer_id"] == cluster.boot.peer_id
    hists = set()
    for r in nodes:
        d = r["profile"]["data"]
        assert d["dataset"] == "digits" and d["task"] == "classification"
        assert d["samples"] > 0 and sum(d["label_hist"]) == d["samples"] and len(d["label_hist"]) == 10
        assert r["profile"]["memory_mb"] > 0 and r["addrs"] and r["last_seen_s"] < 5
        hists.add(tuple(d["label_hist"]))
    assert len(hists) == N_NODES - 1, "dirichlet shards should differ"
    # The advertised statistics are the node's own: compare with its status.
    st = control(cluster.nodes[1].home, "status")
    seen = [r for r in rows if r["peer_id"] == cluster.nodes[1].peer_id][0]
    assert seen["profile"]["data"]["label_hist"] == st["profile"]["data"]["label_hist"]
    assert st["peers"] == N_NODES and st["network"] == "cluster" and st["uptime_s"] > 0
    assert st["counters"].get("bytes.gossip.profiles.out", 0) > 0 or st["counters"].get("bytes.peers.out", 0) > 0


@pytest.mark.timeout(90)
def test_kill9_leaves_every_table_within_1s_and_restart_keeps_identity(cluster: Cluster) -> None:
    cluster.ensure_up()
    victim = cluster.nodes[4]
    old_id = victim.peer_id
    victim.kill()
    took = time_until_gone(cluster, old_id, cluster.observers(victim), KILL_BOUND_S)
    print(f"\nkill -9: gone from all tables in {took:.2f} s")
    assert took <= KILL_BOUND_S
    # node.json is stale now: the CLI must not be fooled by it.
    assert (victim.home / "node.json").exists()
    r = run_cli("status", "--home", str(victim.home), "--json")
    assert r.returncode == 2 and "no node running in" in r.stderr and "snakenode start --home" in r.stderr
    victim.start()
    victim.wait_ready()
    assert victim.peer_id == old_id
    cluster.wait_converged(20, "the restarted node to rejoin every table")


@pytest.mark.timeout(90)
def test_frozen_peer_leaves_within_5_5s_and_returns_after_sigcont(cluster: Cluster) -> None:
    cluster.ensure_up()
    victim = cluster.nodes[3]
    victim.signal(signal.SIGSTOP)
    try:
        took = time_until_gone(cluster, victim.peer_id, cluster.observers(victim), FREEZE_BOUND_S)
    finally:
        victim.signal(signal.SIGCONT)
    print(f"\nSIGSTOP: gone from all tables in {took:.2f} s")
    assert took <= FREEZE_BOUND_S
    t0 = time.monotonic()
    cluster.wait_converged(20, "the resumed node to come back in every table")
    print(f"SIGCONT: back in all tables in {time.monotonic() - t0:.2f} s")


@pytest.mark.timeout(120)
def test_drop_times_hold_while_observer_trains(cluster: Cluster) -> None:
    """The observer's own worker saturates the cores with torch; liveness must still keep its promises."""
    cluster.ensure_up()
    observer = cluster.nodes[0]
    # A (re)started node measures its compute first, in the same worker: let that finish.
    wait_for(lambda: not control(observer.home, "status")["worker"]["busy"], 60, "the observer's start-up benchmark")
    # `snakenode bench`: the compute benchmark, a torch workload, in the observer's own worker.
    burn = control(observer.home, "bench", {"seconds": 25.0}, timeout=5)
    assert burn["started"]
    wait_for(lambda: control(observer.home, "status")["worker"]["busy"], 30, "the observer's worker to be busy")
    victim = cluster.nodes[2]
    victim.kill()
    took = time_until_gone(cluster, victim.peer_id, [observer], KILL_BOUND_S)
    print(f"\nbusy observer, kill -9: dropped in {took:.2f} s")
    assert took <= KILL_BOUND_S
    frozen = cluster.nodes[1]
    frozen.signal(signal.SIGSTOP)
    try:
        took2 = time_until_gone(cluster, frozen.peer_id, [observer], FREEZE_BOUND_S)
    finally:
        frozen.signal(signal.SIGCONT)
    print(f"busy observer, SIGSTOP: dropped in {took2:.2f} s")
    assert took2 <= FREEZE_BOUND_S
    st = control(observer.home, "status")
    assert st["worker"]["busy"], "the torch job should still be running during the measurement"
    # No false positives: the healthy peers stayed in the busy observer's table.
    healthy = {cluster.nodes[3].peer_id, cluster.nodes[4].peer_id, cluster.boot.peer_id}
    assert healthy <= peer_ids(observer.home)
    control(observer.home, "bench", {"seconds": 0.0}, timeout=5)


@pytest.mark.timeout(90)
def test_bootstrap_loss_and_restart(cluster: Cluster) -> None:
    cluster.ensure_up()
    cluster.boot.kill()
    nodes = cluster.nodes
    node_ids = {n.peer_id for n in nodes}
    time_until_gone(cluster, cluster.boot.peer_id, nodes, KILL_BOUND_S)
    # Without the bootstrap peer the nodes still see each other (direct connections).
    for n in nodes:
        assert peer_ids(n.home) == node_ids - {n.peer_id}
    # Restarted with the same HOME and port: the nodes reconnect on their own (backoff + jitter).
    port = cluster.boot_addr.split("/tcp/")[1].split("/")[0]
    cluster.boot.argv[cluster.boot.argv.index("--listen") + 1] = f"/ip4/127.0.0.1/tcp/{port}"
    cluster.boot.start()
    cluster.boot.wait_ready()
    assert cluster.boot.addr == cluster.boot_addr
    cluster.wait_converged(40, "the restarted bootstrap peer to rejoin every table")


@pytest.mark.timeout(60)
def test_sigterm_exits_zero_within_5s_and_cleans_up(cluster: Cluster) -> None:
    cluster.ensure_up()
    victim = cluster.nodes[4]
    info = victim.node_json()
    assert info is not None
    t0 = time.monotonic()
    code = victim.stop(timeout=8)
    took = time.monotonic() - t0
    assert code == 0, victim.tail()
    assert took < 5.0
    assert not (victim.home / "node.json").exists()
    assert not Path(info["control"]).exists()
    assert "Traceback" not in victim.log_text()
    victim.start()
    victim.wait_ready()
