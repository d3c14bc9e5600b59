"""Issue 2 across real network namespaces: 4 nodes + a bootstrap peer, each on its own IP on a bridge."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness import PY, Net, peer_ids, snakenode_cmd

from scenarios import netns

ok, why = netns.available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]


@pytest.mark.timeout(120)
def test_discovery_through_bootstrap_in_its_own_namespace(tmp_path: Path) -> None:
    net = Net(tmp_path, network="ns")
    with netns.Lab() as lab:
        try:
            names = ["boot", "n0", "n1", "n2", "n3"]
            for name in names:
                lab.add_host(name)
            boot = net.start_argv("boot", lab.argv("boot", [
                PY, "-m", "bootstrap", "--home", str(net.home("boot")), "--listen", "/ip4/0.0.0.0/tcp/4001",
                "--network", "ns"]))
            info = boot.wait_ready()
            boot_ip = lab.hosts["boot"].ip
            boot_addr = [a for a in info["addrs"] if f"/ip4/{boot_ip}/" in a]
            assert boot_addr, f"the bootstrap peer should advertise its namespace address: {info['addrs']}"
            nodes = []
            for i, name in enumerate(names[1:]):
                nodes.append(net.start_argv(name, lab.argv(name, [
                    *snakenode_cmd(), "start", "--home", str(net.home(name)), "--listen", "/ip4/0.0.0.0/tcp/4001",
                    "--network", "ns", "--bootstrap", boot_addr[0], "--data", "digits",
                    "--partition", "dirichlet:0.3", "--shard", f"{i}/4"])))
            for n in nodes:
                n.wait_ready()
            everyone = {p.peer_id for p in [boot, *nodes]}

            def converged() -> bool:
                return all(peer_ids(p.home) == everyone - {p.peer_id} for p in [boot, *nodes])

            net.wait(converged, 40, "every namespace host to see every other")
            # Peers reach each other on their namespace IPs, not through loopback.
            from harness import control

            rows = control(nodes[0].home, "peers")
            for r in rows:
                if r["role"] == "node":
                    assert any(a.startswith("/ip4/10.231.") for a in r["addrs"]), r["addrs"]
            # Cutting one host's link drops it from the others within the frozen-peer bound (a cut link looks like
            # a frozen peer: no RST, pings go unanswered; see FREEZE_BOUND_S in test_net_cluster.py for the sum).
            lab.link_down("n3")
            net.wait(lambda: all(nodes[3].peer_id not in peer_ids(p.home) for p in nodes[:3]), 5.5,
                     "the cut-off host to leave the others' tables")
            lab.link_up("n3")
            net.wait(converged, 40, "the host to return after its link came back")
        finally:
            net.close()
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"snk{lab.tag}-" not in leftovers
