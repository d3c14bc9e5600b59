"""Issue 5: CS mode with a coordinator peer, real processes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import control
from snakenet import SnakeNet, job_toml, laps_holders, wait_event

from snakenode.snake import hoplog


@pytest.mark.timeout(200)
def test_cs_job_completes_with_uploads_and_downloads_via_the_coordinator(tmp_path: Path) -> None:
    sn = SnakeNet(tmp_path, network="cs", submitter="coord")
    try:
        coord = sn.add_coordinator()
        for i in range(4):
            sn.add_node(f"n{i}", f"{i}/4")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=3), mode="cs")
        wait_event(sn, job_id, lambda r: r["event"] == "train_start" and r["hop"] == 1, 90, "hop 1 to start")
        sched = control(coord.home, "status")["schedule"]
        assert sched and sched[0]["job_id"] == job_id and ("assigned" in sched[0] or "planned" in sched[0])
        detail = sn.wait_complete(job_id, 150)
        c = detail["summary"]["completed"]
        assert c["test"]["accuracy"] >= 0.85 and c["holder"] == sn.ids["coord"]
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        members = {sn.ids[f"n{i}"] for i in range(4)}
        for lap, holders in laps_holders(records).items():
            assert sorted(holders) == sorted(members), lap
        downloads = [r for r in records if r["event"] == "handoff" and r["node"] == sn.ids["coord"]]
        uploads = [r for r in records if r["event"] == "handoff" and (r["detail"] or {}).get("upload")]
        received = [r for r in records if r["event"] == "committed" and (r["detail"] or {}).get("upload")]
        # Hop 0 may move nothing: the node builds the same deterministic initial layers itself.
        assert len(downloads) == 12 and all(r["bytes"]["bundle_out"] > 0 for r in downloads if r["hop"] > 0)
        assert len(uploads) == 12 and all(r["bytes"]["bundle_out"] > 0 and r["node"] in members for r in uploads)
        assert len(received) == 12 and all(r["node"] == sn.ids["coord"] and r["bytes"]["bundle_in"] > 0
                                           for r in received)
        # Nodes never handed the snake to each other directly.
        assert not [r for r in records if r["event"] == "handoff" and r["node"] in members
                    and not (r["detail"] or {}).get("upload")]
    finally:
        sn.close()


@pytest.mark.timeout(240)
def test_cs_node_lost_is_reassigned_and_coordinator_restart_resumes(tmp_path: Path) -> None:
    sn = SnakeNet(tmp_path, network="csfault", submitter="coord")
    try:
        coord = sn.add_coordinator()
        sn.add_node("n0", "0/3")
        sn.add_node("n1", "1/3", extra=["--test-faults", "exit@train:attempt=0"])
        sn.add_node("n2", "2/3", extra=["--compute-slowdown", "10"])
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=2, epochs=2, drop_after_s=5), mode="cs")
        # n1 dies at the start of its first hop: the coordinator reassigns that hop as the next attempt.
        retry = wait_event(sn, job_id, lambda r: r["event"] == "retry", 90, "the coordinator to reassign a hop")
        assert retry["node"] == sn.ids["coord"] and retry["detail"]["failed_holder"] == sn.ids["n1"]
        wait_event(sn, job_id, lambda r: r["event"] == "reassigned", 60, "the reassigned hop to commit")
        # Kill -9 the coordinator while the slow node n2 trains, then restart it with the same HOME.
        start = wait_event(sn, job_id, lambda r: r["event"] == "train_start" and r["holder"] == sn.ids["n2"],
                           120, "n2 to start training", )
        coord.signal(signal.SIGKILL)
        coord.popen.wait(timeout=10)
        wait_event(sn, job_id, lambda r: r["event"] == "trained" and r["hop"] == start["hop"], 120,
                   "n2 to finish its hop without the coordinator")
        st = control(sn.net.home("n2"), "status")
        assert st["state"]["kind"] in ("waiting", "sending"), st["state"]
        coord.start()
        coord.wait_ready()
        detail = sn.wait_complete(job_id, 200)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        up = [r for r in records if r["event"] == "committed" and (r["detail"] or {}).get("upload")
              and r["hop"] == start["hop"]]
        assert up and up[0]["holder"] == sn.ids["n2"], "n2 kept its result and uploaded it after the restart"
        assert len({r["lineage"] for r in records if r["event"] == "job_complete"}) == 1
    finally:
        sn.close()


@pytest.mark.timeout(200)
def test_cs_fallback_to_p2p_when_the_coordinator_never_returns(tmp_path: Path) -> None:
    sn = SnakeNet(tmp_path, network="csfb", submitter="coord")
    try:
        coord = sn.add_coordinator()
        for i in range(3):
            sn.add_node(f"n{i}", f"{i}/3", extra=["--compute-slowdown", "4"])
        sn.wait_ready()
        toml = job_toml(laps=2, epochs=2, drop_after_s=5).replace('name = "test-job"',
                                                                  'name = "test-job"\nfallback = "p2p"')
        job_id = sn.submit(toml, mode="cs")
        wait_event(sn, job_id, lambda r: r["event"] == "train_start" and r["hop"] == 1, 90, "hop 1 to start",
                   )
        coord.signal(signal.SIGKILL)
        coord.popen.wait(timeout=10)
        detail = sn.wait_complete(job_id, 150, node="n0")
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        c = detail["summary"]["completed"]
        assert c["holder"] != sn.ids["coord"]
        fallback = [r for r in records if r["event"] == "proposed" and (r["detail"] or {}).get("fallback") == "p2p"]
        assert fallback, "a node must switch the job to P2P mode"
        p2p_handoffs = [r for r in records if r["event"] == "handoff" and r["node"] != sn.ids["coord"]
                        and not (r["detail"] or {}).get("upload")]
        assert p2p_handoffs, "after the fallback, nodes hand the snake to each other"
        assert len({r["lineage"] for r in records if r["event"] == "job_complete"}) == 1
    finally:
        sn.close()
