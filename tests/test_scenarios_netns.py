"""Issue 6 on network namespaces: partition-heal (split 3|3, heal, one lineage survives), a polite refusal
without root, and no namespace, veth, bridge or node left behind after the runner is SIGKILLed or
interrupted (Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import wait_for
from test_scenarios import REPO, expectations, gone, load_report, scenarios_cli

from scenarios import netns

ok, why = netns.available()
# The netns backend needs root and `ip netns`; without them each such test is skipped saying which is missing.
needs_root = pytest.mark.skipif(not ok, reason=why)


@pytest.mark.slow
@pytest.mark.timeout(330)
@pytest.mark.netns
@needs_root
def test_partition_heal_keeps_one_lineage(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    r = scenarios_cli("run", "partition-heal", "--backend", "netns", "--report", str(out), timeout=320)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rep = load_report(out)
    kinds = [f["kind"] for f in rep["faults"] if f["fired"]]
    assert kinds == ["partition", "heal"], rep["faults"]
    part, heal = rep["faults"]
    assert 7.5 <= heal["t"] - part["t"] <= 10, (part, heal)
    exp = expectations(rep)
    assert exp["one_lineage"]["ok"] and exp["job_completes"]["ok"] and exp["no_bundle_lost"]["ok"], exp
    # The split really forked the snake: the predecessor retried on its side, and that side lost.
    off = [h for h in rep["hops"] if not h["surviving"]]
    assert off, "the partition should leave at least one hop off the surviving lineage"
    sides = [{"node1", "node2", "node3"}, {"node4", "node5", "node6"}]
    assert all({h["holder"] for h in rep["hops"]} & side for side in sides)


def test_netns_backend_refuses_politely_without_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        r = scenarios_cli("run", "partition-heal", "--backend", "netns", "--report", str(tmp_path / "r"),
                          timeout=60)
    else:  # drop to nobody for this one command: the refusal path is what a non-root user sees
        tmp_path.chmod(0o777)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "scenarios", "run", "partition-heal", "--report", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "need root" in r.stderr and "local backend" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def _start_runner(scenario: str, out: Path) -> subprocess.Popen[bytes]:
    """`python -m scenarios run SCENARIO --backend netns` in the background. A shell's background job
    inherits SIGINT ignored (and Python then installs no Ctrl-C handler): the child gets the default back,
    as for a runner started from a terminal."""
    return subprocess.Popen([sys.executable, "-m", "scenarios", "run", scenario, "--backend", "netns",
                             "--report", str(out)], cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.timeout(180)
@pytest.mark.netns
@needs_root
def test_netns_cleanup_after_the_runner_is_sigkilled(tmp_path: Path) -> None:
    out = tmp_path / "r"
    runner = _start_runner("partition-heal", out)
    state_file = netns.STATE_DIR / f"{runner.pid % 100000}.json"
    try:
        def lab_up() -> dict[str, object] | None:
            state = json.loads(state_file.read_text())
            # Hosts start concurrently: wait for each node.json the test reads, not for the last one listed.
            up = all((out / "run" / n / "node.json").exists() for n in ("bootstrap", "node1", "node6"))
            return state if len(state["namespaces"]) == 7 and up else None

        state = wait_for(lab_up, 120, "the runner's lab with 7 namespaces and its nodes up")
        pids = [int(json.loads((out / "run" / n / "node.json").read_text())["pid"])
                for n in ("bootstrap", "node1", "node6")]
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)

    def clean() -> bool:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        if any(ns in names for ns in [*state["namespaces"], state["switch"]]):  # type: ignore[list-item]
            return False
        # The bridge and the outer veth ends live in the switch namespace: its removal takes them along, and
        # nothing of the lab may ever appear in the root namespace.
        return f"{state['bridge']}:" not in links and f"snk{runner.pid % 100000}" not in links \
            and not state_file.exists()

    wait_for(clean, 30, "the watchdog to remove every namespace (the switch's too) of the killed runner's lab")
    wait_for(lambda: all(gone(p) for p in pids), 10, "the lab's processes to be gone")


@pytest.mark.timeout(180)
@pytest.mark.netns
@needs_root
def test_ctrl_c_stops_the_run_and_removes_the_lab(tmp_path: Path) -> None:
    out = tmp_path / "r"
    runner = _start_runner("slow-link", out)
    state_file = netns.STATE_DIR / f"{runner.pid % 100000}.json"
    try:
        state = wait_for(lambda: json.loads(state_file.read_text()) if (out / "run" / "slow" / "node.json").exists()
                         else None, 120, "the lab and its hosts")
        runner.send_signal(signal.SIGINT)
        code = runner.wait(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert code == 130
    rep = load_report(out)  # the report is still written, saying why the run stopped
    assert not rep["ok"] and "interrupted" in rep["error"]
    # The runner itself tore the lab down before exiting (no watchdog needed).
    assert not state_file.exists()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in names for ns in state["namespaces"]), names
