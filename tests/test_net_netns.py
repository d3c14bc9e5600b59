"""Issue 2 across real network namespaces: 4 nodes + a bootstrap peer, each on its own IP on a bridge."""

from __future__ import annotations

import shutil
import subprocess
import time
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


def _docker_style_firewall() -> tuple[str, str]:
    """Puts the root namespace in the state a Docker install leaves it in; returns what to restore."""
    nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not nf.exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    if not nf.exists():
        pytest.skip("bridge netfilter (br_netfilter) is not available in this kernel, so the Docker trap cannot arise")
    policy = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=True).stdout
    old_policy = "DROP" if "-P FORWARD DROP" in policy else "ACCEPT"
    old_nf = nf.read_text().strip()
    subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)
    nf.write_text("1")
    return old_policy, old_nf


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is missing (scripts/apt-deps.sh installs it)")
def test_lab_carries_traffic_under_dockers_forward_drop() -> None:
    """Docker sets the root FORWARD policy to DROP with bridge netfilter on; a root-namespace bridge then drops
    every frame between lab hosts. The lab's bridge lives in its own namespace, so it must not care."""
    old_policy, old_nf = _docker_style_firewall()
    try:
        with netns.Lab() as lab:
            for name in ("a", "b", "c"):
                lab.add_host(name)
            lab.verify()  # raises, naming the cause, if a frame is dropped
            rx_before = lab.link_counters()["b"][0]
            r = subprocess.run(lab.argv("a", [PY, "-c", "import socket; s=socket.socket(); s.settimeout(2);"
                                                        f"s.connect_ex(('{lab.hosts['b'].ip}', 9))"]),
                               capture_output=True, text=True, timeout=20)
            assert r.returncode == 0, r.stderr
            assert lab.link_counters()["b"][0] > rx_before, "host b's link should have counted the probe"
        after = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
        assert "-P FORWARD DROP" in after, "the lab must leave the host's firewall as it found it"
    finally:
        subprocess.run(["iptables", "-P", "FORWARD", old_policy], check=True)
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text(old_nf)


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is missing (scripts/apt-deps.sh installs it)")
def test_a_lab_that_drops_frames_fails_fast_and_names_the_cause() -> None:
    with netns.Lab() as lab:
        for name in ("a", "b"):
            lab.add_host(name)
        subprocess.run(["ip", "netns", "exec", lab.switch, "iptables", "-P", "FORWARD", "DROP"], check=True)
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if not nf.exists():
            pytest.skip("bridge netfilter (br_netfilter) is not available, so a firewall cannot drop bridged frames")
        subprocess.run(["ip", "netns", "exec", lab.switch, "sh", "-c",
                        "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables"], check=True)
        t0 = time.monotonic()
        with pytest.raises(netns.NetnsError) as err:
            lab.verify(timeout_s=1.0)
        assert time.monotonic() - t0 < 10
        text = str(err.value)
        assert "cannot reach b" in text and "-P FORWARD DROP" in text and "bridge-nf-call-iptables=1" in text, text
