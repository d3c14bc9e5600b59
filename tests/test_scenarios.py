"""Issue 6: the scenario runner. Pure parts (schema, triggers) directly; the library's line3-smoke and
ring5-dropout as real runs of `python -m scenarios run` (local backend); an impossible expectation; the
compose project (parsed with pyyaml, every host named, every host config accepted by the node's own
config loader); refusals (no Docker engine); no node outlives a SIGKILLed runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import wait_for

from scenarios import library, spec, timeline
from scenarios.spec import ScenarioError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["line3-smoke", "ring5-dropout", "star8-churn", "hetero6", "partition-heal", "slow-link", "freeze-crash",
           "cs-coordinator-loss", "bootstrap-loss"]


def scenarios_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SNAKENODE_HOME", None)
    return subprocess.run([sys.executable, "-m", "scenarios", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def gone(pid: int) -> bool:
    """Dead, or a zombie not reaped yet (it runs no code and holds no sockets)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


def load_report(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "report.json").read_text()))


def expectations(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in report["expectations"]}


# ---------------------------------------------------------------------------------------------- schema


def test_library_has_every_issue_scenario_and_each_validates() -> None:
    names = {p.stem for p in library.library()}
    assert set(LIBRARY) <= names
    for path in library.library():
        sc = spec.load(path)
        assert sc.name == path.stem, f"{path}: name {sc.name!r} should match the file name"
        assert sc.expect, f"{path} has no expectations"
    r = scenarios_cli("list", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    listed = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(LIBRARY) <= set(listed)
    assert all("error" not in row for row in listed.values()), listed
    # The issue's spelling `scenarios/ring5-dropout.toml` resolves to the library file.
    assert library.resolve("scenarios/ring5-dropout.toml").name == "ring5-dropout.toml"


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t", "hosts": [{"name": "a"}, {"name": "b"}],
        "jobs": [{"file": "jobs/digits-noniid.toml", "submit_from": "a"}],
        "expect": {"job_completes": 60},
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(("changes", "key", "words"), [
    ({"hosts": [{"name": "a", "bandwidth": "fast"}]}, "hosts[0].bandwidth", "1MB/s"),
    ({"hosts": [{"name": "a", "memory": 5}]}, "hosts[0].memory", "known keys"),
    ({"hosts": [{"name": "a"}, {"name": "a"}]}, "hosts", "duplicate"),
    ({"links": {"a": {"latency_ms": 20}}}, "links.a.latency_ms", "netem"),
    ({"links": {"zz": {"bandwidth": "1Mbit/s"}}}, "links.zz", "not a host"),
    ({"jobs": [{"file": "jobs/digits-noniid.toml", "submit_from": "c"}]}, "jobs[0].submit_from", "not a host"),
    ({"jobs": [{"file": "jobs/nope.toml", "submit_from": "a"}]}, "jobs[0].file", "not found"),
    ({"jobs": [{"file": "jobs/digits-noniid.toml", "submit_from": "a", "set": {"laps": 0}}]}, "jobs[0].set", "laps"),
    ({"faults": [{"kind": "kill", "target": "a"}]}, "faults[0]", "exactly one trigger"),
    ({"faults": [{"kind": "kill", "target": "a", "on": {"event": "trainn"}}]}, "faults[0].on.event", "one of"),
    ({"faults": [{"kind": "kill", "target": "holder", "at_s": 3}]}, "faults[0].target", "on = {event"),
    ({"faults": [{"kind": "explode", "target": "a", "at_s": 1}]}, "faults[0].kind", "one of"),
    ({"faults": [{"kind": "partition", "groups": [["a"]], "at_s": 1}]}, "faults[0].groups", "two non-empty"),
    ({"faults": [{"kind": "hook", "target": "a", "hook": "exit@nowhere"}]}, "faults[0].hook", "PHASE"),
    ({"faults": [{"kind": "kill", "target": "a", "at_s": 1, "duration_s": -1}]}, "faults[0].duration_s", ">"),
    ({"expect": {"accuracy_at_least": 1.5}}, "expect.accuracy_at_least", "<= 1"),
    ({"expect": {"job_finishes": 10}}, "expect.job_finishes", "known keys"),
    ({"expect": {}}, "expect", "at least one expectation"),
    ({"faults": [{"kind": "leave", "target": "bootstrap", "at_s": 1}]}, "faults[0].target", "not of leave"),
    ({"faults": [{"kind": "kill", "target": "boot", "at_s": 1}]}, "faults[0].target", "bootstrap"),
    ({"expect": {"hosts_held_the_snake": ["zz"]}}, "expect.hosts_held_the_snake", "zz not a host"),
    ({"expect": {"hosts_held_the_snake": "a"}}, "expect.hosts_held_the_snake", "list of host names"),
])
def test_validation_errors_name_the_key(changes: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ScenarioError) as exc:
        spec.parse(_doc(**changes), REPO / "scenarios" / "t.toml")
    assert exc.value.key == key, str(exc.value)
    assert str(exc.value).startswith(key) and words in str(exc.value), str(exc.value)


def test_overrides_reach_the_job_and_shards_are_assigned() -> None:
    sc = spec.parse(_doc(jobs=[{"file": "jobs/digits-noniid.toml", "submit_from": "a",
                                "set": {"laps": 5, "train.epochs": 7, "lap": {"drop_after_s": 4}}}]))
    job = sc.jobs[0].spec
    assert (job["laps"], job["train"]["epochs"], job["lap"]["drop_after_s"]) == (5, 7, 4.0)
    assert [h.shard for h in sc.hosts] == ["0/2", "1/2"]


def _rec(event: str, hop: int, holder: str, prev: str | None, node: str | None = None) -> dict[str, Any]:
    return {"event": event, "hop": hop, "attempt": 0, "holder": holder, "prev_holder": prev, "node": node or holder}


def test_triggers_match_hop_log_records() -> None:
    name_of = {"P1": "a", "P2": "b", "P3": "c", "P4": "d"}
    kill = spec.parse(_doc(faults=[{"kind": "kill", "target": "holder", "on": {"event": "train_start", "hop": 4},
                                    "after_s": 0.5}])).faults[0]
    assert kill.trigger is not None
    assert not timeline.matches(kill.trigger, _rec("train_start", 3, "P1", None), name_of)
    # A gossiped copy written by another node is not the holder's own event.
    assert not timeline.matches(kill.trigger, _rec("train_start", 4, "P1", None, node="P2"), name_of)
    assert timeline.matches(kill.trigger, _rec("train_start", 4, "P1", None), name_of)
    pending = timeline.initial((kill,), t0=100.0)
    timeline.observe(pending, _rec("train_start", 4, "P3", "P1"), seen_at=120.0, name_of=name_of)
    assert pending[0].target == "c" and pending[0].due == 120.5
    assert not timeline.take_due(pending, 120.4) and timeline.take_due(pending, 120.5)[0].target == "c"

    part = spec.parse(_doc(hosts=[{"name": n} for n in "abcd"], faults=[{
        "kind": "partition", "groups": [["a", "b"], ["c", "d"]], "on": {"event": "train_start", "crossing": True},
        "duration_s": 5}])).faults[0]
    assert part.trigger is not None
    assert not timeline.matches(part.trigger, _rec("train_start", 2, "P2", "P1"), name_of, part.groups)
    assert timeline.matches(part.trigger, _rec("train_start", 2, "P3", "P1"), name_of, part.groups)
    heal = timeline.inverse(timeline.Pending(part, "partition"), fired_at=10.0, original_bandwidth="")
    assert heal is not None and (heal.kind, heal.due) == ("heal", 15.0)


# ---------------------------------------------------------------------------------------------- compose


def test_compose_project_parses_and_names_every_host(tmp_path: Path) -> None:
    from snakenode import config, identity

    for name in LIBRARY:
        out = tmp_path / name
        r = scenarios_cli("compose", name, "-o", str(out), timeout=60)
        assert r.returncode == 0, r.stderr
        doc = yaml.safe_load((out / "compose.yaml").read_text())
        sc = spec.load(library.resolve(name))
        services = doc["services"]
        assert set(services) == {"bootstrap", *(h.name for h in sc.hosts)}, name
        boot_id = identity.load(out / "hosts" / "bootstrap").peer_id
        ips = set()
        for h in sc.hosts:
            svc = services[h.name]
            assert svc["image"] == services["bootstrap"]["image"]
            assert f"./hosts/{h.name}:/data" in svc["volumes"]
            ips.add(svc["networks"]["snake"]["ipv4_address"])
            assert ("profiles" in svc) == (h.start_delay_s > 0)
            cfg_file = out / "hosts" / h.name / "snakenode.toml"
            tomllib.loads(cfg_file.read_text())
            cfg = config.load(cfg_file.parent, {}, env={})  # the node's own loader accepts it
            assert cfg.role == h.role and cfg.data == h.data and cfg.network == sc.network
            # The bootstrap peer first, then the first two hosts that start at once (a late host still joins
            # through them while the bootstrap container is down).
            assert cfg.bootstrap[0] == f"/ip4/172.30.77.2/tcp/4001/p2p/{boot_id}" and len(cfg.bootstrap) == 3
            early = [x for x in sc.hosts if x.start_delay_s == 0][:2]
            assert [a.rsplit("/p2p/", 1)[1] for a in cfg.bootstrap[1:]] == \
                [identity.load(out / "hosts" / x.name).peer_id for x in early]
            if h.bandwidth:
                assert any("rate=" in part for part in svc["command"]), svc["command"]
        assert len(ips) == len(sc.hosts)
        assert services["bootstrap"]["build"]["dockerfile"] == "Dockerfile"
        for j in sc.jobs:
            assert (out / "jobs" / f"{j.name}.toml").exists()


def test_compose_backend_refuses_clearly_without_an_engine(tmp_path: Path) -> None:
    from scenarios.compose import engine_problem

    if engine_problem() is None:
        pytest.skip("a Docker engine answers here: `make test-scenarios --backend compose` exercises it")
    r = scenarios_cli("run", "line3-smoke", "--backend", "compose", "--report", str(tmp_path / "r"), timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "docker" in r.stderr and "--backend local" in r.stderr, r.stderr
    assert not (tmp_path / "r" / "report.json").exists()


# ---------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_line3_smoke(tmp_path: Path) -> None:
    out = tmp_path / "line3"
    r = scenarios_cli("run", "line3-smoke", "--report", str(out), timeout=230)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = load_report(out)
    assert rep["ok"] and rep["backend"] == "local" and rep["faults"] == []
    exp = expectations(rep)
    assert set(exp) == {"job_completes", "accuracy_at_least", "max_hops_redone", "no_bundle_lost",
                        "every_member_visited_each_lap", "one_lineage"}
    assert all(e["ok"] for e in exp.values()), exp
    assert exp["accuracy_at_least"]["value"] >= 0.6
    job = rep["jobs"][0]
    assert job["completed"] and job["hops"] == len([h for h in rep["hops"] if h["surviving"]]) >= 6
    assert job["fetch"]["bytes"] > 0 and (out / "final-main.safetensors").stat().st_size == job["fetch"]["bytes"]
    holders = [h["holder"] for h in rep["hops"] if h["surviving"]]
    assert set(holders) == {"node1", "node2", "node3"}
    for png in ("accuracy.png", "bytes_per_hop.png", "path.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ring5_dropout_kills_the_training_holder_and_recovers(tmp_path: Path) -> None:
    out = tmp_path / "ring5"
    r = scenarios_cli("run", "scenarios/ring5-dropout.toml", "--report", str(out), timeout=290)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = load_report(out)
    (kill,) = [f for f in rep["faults"] if f["kind"] == "kill"]
    assert kill["fired"] and kill["target_state"] == "training", kill
    # A SIGKILLed holder's connection closes at once: its predecessor sees it gone and retries after the
    # 1 s disconnect grace (snake/handoff.py DISCONNECT_GRACE_S), ~1.5 s in all (docs/DESIGN.md: "seen through
    # its closed connection within a fraction of a second"); the lease lapse would take 6 s
    # (LEASE_TIMEOUT_S). The retry must name the disconnect, and the snake must move again within the
    # disconnect path's ~1.5 s plus a 3 s margin for re-proposing, the bundle and a loaded 2-core machine:
    # under the 6 s the lease path needs at the least.
    (retry,) = [x for x in rep["jobs"][0]["retries"] if x["hop"] == 3]
    assert retry["why"] == "disconnect" and retry["failed_holder"] == kill["target"], retry
    assert 0 < retry["t"] - kill["t"] < 1.5 + 3.0, (retry, kill)
    assert kill["recovery_s"] is not None and 0 < kill["recovery_s"] < 1.5 + 3.0, kill
    lost = [h for h in rep["hops"] if not h["surviving"]]
    assert [(h["hop"], h["holder"]) for h in lost] == [(3, kill["target"])], lost
    retried = [h for h in rep["hops"] if h["surviving"] and h["hop"] == 3]
    assert retried and retried[0]["attempt"] >= 1 and retried[0]["holder"] != kill["target"]
    assert all(e["ok"] for e in rep["expectations"]), rep["expectations"]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_an_impossible_expectation_fails_the_run(tmp_path: Path) -> None:
    scenario = tmp_path / "impossible.toml"
    scenario.write_text(f"""
name = "impossible"
[[hosts]]
name = "a"
[[hosts]]
name = "b"
[[jobs]]
file = "{REPO / 'jobs' / 'digits-noniid.toml'}"
submit_from = "a"
set = {{ laps = 1 }}
[[faults]]
kind = "kill"             # never due: the run ends long before
target = "b"
at_s = 900
[expect]
job_completes = 0.01      # a hundredth of a second: no job can
no_bundle_lost = true
""")
    out = tmp_path / "r"
    r = scenarios_cli("run", str(scenario), "--report", str(out), timeout=190)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    rep = load_report(out)
    exp = expectations(rep)
    assert not rep["ok"] and not exp["job_completes"]["ok"] and exp["job_completes"]["value"] > 0.01
    assert exp["no_bundle_lost"]["ok"], exp["no_bundle_lost"]  # the run itself was fine: only the bar is impossible
    # a scripted fault whose time never came is reported, not left out of the count
    fi = exp["faults_injected"]
    assert not fi["ok"] and fi["value"] == 0 and fi["limit"] == 1 and "faults[0] kill b (at 900 s)" in fi["detail"], fi
    assert "FAIL" in r.stdout


@pytest.mark.timeout(120)
def test_no_node_outlives_a_sigkilled_runner(tmp_path: Path) -> None:
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runner = subprocess.Popen([sys.executable, "-m", "scenarios", "run", "line3-smoke", "--report", str(out)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def pids() -> list[int] | None:
            found = []
            for name in ("bootstrap", "node1", "node2", "node3"):
                info = json.loads((out / "run" / name / "node.json").read_text())
                found.append(int(info["pid"]))
            return found

        nodes = wait_for(pids, 90, "the runner's hosts to start")
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)

    wait_for(lambda: all(gone(p) for p in nodes), 15, "every node to die with the runner (PR_SET_PDEATHSIG)")


# Issue 21: more of the library under `make test`. freeze-crash (a frozen training holder, a crash
# mid-receive through a protocol hook) and cs-coordinator-loss (CS mode, the coordinator killed, fallback
# to P2P) exercise the fault kinds and the mode that line3-smoke and ring5-dropout do not; ~40-50 s each
# on an idle 2-core machine. star8-churn (~55 s), hetero6 (minutes) and the netns ones run under
# `make test-scenarios`.


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_freeze_crash_recovers_from_a_frozen_holder_and_a_crash_mid_receive(tmp_path: Path) -> None:
    out = tmp_path / "fc"
    r = scenarios_cli("run", "freeze-crash", "--report", str(out), timeout=290)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = load_report(out)
    faults = {f["kind"]: f for f in rep["faults"]}
    assert faults["stop"]["fired"] and faults["stop"]["target_state"] == "training", faults
    assert faults["hook"]["fired"] and faults["hook"]["target"] == "node2", faults
    retried = {(x["hop"], x["failed_holder"]) for x in rep["jobs"][0]["retries"]}
    assert (6, faults["stop"]["target"]) in retried, rep["jobs"][0]["retries"]  # the frozen holder's hop
    assert any(who == "node2" for _, who in retried), retried  # the crash mid-receive
    exp = expectations(rep)
    assert set(exp) >= {"accuracy_at_least", "max_recovery_s", "one_lineage", "faults_injected"}
    assert all(e["ok"] for e in exp.values()), exp


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cs_coordinator_loss_falls_back_to_p2p_and_learns(tmp_path: Path) -> None:
    out = tmp_path / "cs"
    r = scenarios_cli("run", "cs-coordinator-loss", "--report", str(out), timeout=290)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = load_report(out)
    (kill,) = [f for f in rep["faults"] if f["kind"] == "kill"]
    assert kill["fired"] and kill["target"] == "coord" and kill["recovery_s"] is not None, kill
    job = rep["jobs"][0]
    assert job["completed"] and job["final_holder"] != "coord", job
    done_after_kill = [h for h in rep["hops"] if h["surviving"] and h["t_recv"] is not None
                       and h["t_recv"] > kill["t"]]
    assert done_after_kill and {h["holder"] for h in done_after_kill} <= {"node1", "node2", "node3", "node4"}
    exp = expectations(rep)
    assert set(exp) >= {"job_completes", "accuracy_at_least", "no_bundle_lost", "one_lineage"}
    assert all(e["ok"] for e in exp.values()), exp


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_host_joins_while_the_bootstrap_peer_is_down(tmp_path: Path) -> None:
    """Issue 16: the bootstrap peer as a fault target. It is killed 1 s into the job and restarted 20 s later;
    node5 starts in between and must join through the other hosts it was given, before the bootstrap returns."""
    out = tmp_path / "bl"
    r = scenarios_cli("run", "bootstrap-loss", "--report", str(out), timeout=230)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = load_report(out)
    (kill,) = [f for f in rep["faults"] if f["kind"] == "restart"]
    (back,) = [f for f in rep["faults"] if f["kind"] == "start" and f["target"] == "bootstrap"]
    assert kill["target"] == "bootstrap" and kill["fired"] and back["fired"], rep["faults"]
    joined = rep["jobs"][0]["ready_t"]["node5"][0]
    assert kill["t"] < joined < back["t"], (kill["t"], joined, back["t"])
    assert any(h["holder"] == "node5" and h["surviving"] and h["t_recv"] < back["t"] for h in rep["hops"]), \
        "node5 should have trained the snake before the bootstrap peer returned"
    exp = expectations(rep)
    assert exp["hosts_held_the_snake"]["ok"] and all(e["ok"] for e in exp.values()), exp
