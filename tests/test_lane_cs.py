"""Issues 5 + 9: CS mode over the fast bulk lane, real daemons.

A coordinator and two nodes, every daemon with `lane_min_mb = 0` (SNAKENODE_LANE_MIN_MB, so every bundle
takes the lane). Both directions must use it: downloads coordinator -> node (`assign` / `accept.lane`, the
ordinary bundle exchange) and uploads node -> coordinator (`upload.lane` / `upload_ok.lane`, the coordinator
as the receiver). The job completes with a valid hop log, nothing falls back, nothing is refused.
When the coordinator's lane cannot be reached, uploads fall back to the `/snake/cs/1.0.0` stream.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness import control
from snakenet import SnakeNet, job_toml

from snakenode.snake import hoplog


@pytest.mark.timeout(120)
def test_cs_downloads_and_uploads_go_over_the_lane(tmp_path: Path) -> None:
    sn = SnakeNet(tmp_path, network="cslane", submitter="coord")
    try:
        sn.net.env["SNAKENODE_LANE_MIN_MB"] = "0"
        coord = sn.add_coordinator()
        for i in range(2):
            sn.add_node(f"n{i}", f"{i}/2")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=2, epochs=1), mode="cs")
        detail = sn.wait_complete(job_id, 75)
        c = detail["summary"]["completed"]
        assert c["lap"] == 2 and c["holder"] == sn.ids["coord"]
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        ids = sn.ids
        members = {ids["n0"], ids["n1"]}

        handoffs = [r for r in records if r["event"] == "handoff"]
        downloads = [r for r in handoffs if r["node"] == ids["coord"]]
        uploads = [r for r in handoffs if (r["detail"] or {}).get("upload")]
        assert len(downloads) == 4 and len(uploads) == 4, [(r["node"][-6:], r["detail"]) for r in handoffs]
        moved = [r for r in downloads if r["bytes"]["bundle_out"] > 0]
        # A download moves nothing when the node already holds the model: hop 0 (it builds the same initial
        # layers) and a lap's first hop given to the node that ended the previous lap. The second hop of each lap
        # always moves the first hop's window.
        assert len(moved) >= 2, downloads
        for r in moved:
            assert r["detail"] == {"path": "lane"}, r
        for r in downloads:
            assert "fallback" not in (r["detail"] or {}), r
        for r in uploads:
            assert r["node"] in members and r["bytes"]["bundle_out"] > 0, r
            assert r["detail"] == {"upload": True, "to": ids["coord"], "path": "lane"}, r
        commits = [r for r in records if r["event"] == "committed" and (r["detail"] or {}).get("upload")]
        assert len(commits) == 4 and all(r["node"] == ids["coord"] and r["detail"]["path"] == "lane"
                                         and r["bytes"]["bundle_in"] > 0 for r in commits), commits
        received = {(r["holder"], r["hop"], r["attempt"]): r for r in records if r["event"] == "received"}
        for r in moved:
            got = received[(r["holder"], r["hop"], r["attempt"])]
            assert got["detail"]["path"] == "lane" and got["bytes"]["bundle_in"] == r["bytes"]["bundle_out"], got

        # Counters: the coordinator accepted one lane per upload and sent the downloads' bytes on lanes; each
        # node accepted one lane per download it received and sent its uploads' bytes on lanes.
        counters = {n: control(p.home, "status")["counters"] for n, p in sn.nodes.items()}
        cc = counters["coord"]
        assert cc.get("lane.accepted", 0) == len(uploads)
        assert cc.get("bytes.lane.in", 0) >= sum(r["bytes"]["bundle_out"] for r in uploads)
        assert cc.get("bytes.lane.out", 0) >= sum(r["bytes"]["bundle_out"] for r in moved)
        for name in ("n0", "n1"):
            mine_down = [r for r in moved if r["holder"] == ids[name]]
            mine_up = [r for r in uploads if r["node"] == ids[name]]
            nc = counters[name]
            assert nc.get("lane.accepted", 0) == len(mine_down), (name, nc)
            assert nc.get("bytes.lane.in", 0) >= sum(r["bytes"]["bundle_out"] for r in mine_down), (name, nc)
            assert nc.get("bytes.lane.out", 0) >= sum(r["bytes"]["bundle_out"] for r in mine_up), (name, nc)
        for name, cs in counters.items():
            bad = [k for k in cs if k.startswith(("reject.lane.", "error.lane.", "error.handler", "lane.fallback.",
                                                  "reject.cs.", "cs.upload."))]
            assert not bad, (name, {k: cs[k] for k in bad})
        assert "lane_fallback" not in coord.log_text()
    finally:
        sn.close()


@pytest.mark.timeout(60)
def test_cs_uploads_fall_back_to_the_stream_when_the_coordinators_lane_is_unreachable(tmp_path: Path) -> None:
    """The coordinator advertises (lane_announce_port) a port that refuses connections: each upload logs
    `lane_fallback`, counts lane.fallback.connect and goes on the same /snake/cs/1.0.0 stream. (One node:
    its downloads move nothing, it already holds what it uploaded.)"""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connecting to it is refused
    sn = SnakeNet(tmp_path, network="cslanefb", submitter="coord")
    try:
        sn.net.env["SNAKENODE_LANE_MIN_MB"] = "0"
        (sn.net.home("coord") / "snakenode.toml").write_text(f"lane_announce_port = {closed.getsockname()[1]}\n")
        sn.add_coordinator()
        sn.add_node("n0", "0/1")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=2, epochs=1), mode="cs")
        detail = sn.wait_complete(job_id, 45)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        ids = sn.ids
        uploads = [r for r in records if r["event"] == "handoff" and (r["detail"] or {}).get("upload")]
        assert len(uploads) == 2 and all(r["bytes"]["bundle_out"] > 0 for r in uploads), uploads
        for r in uploads:
            assert r["detail"] == {"upload": True, "to": ids["coord"], "path": "libp2p", "fallback": "connect"}, r
        commits = [r for r in records if r["event"] == "committed" and (r["detail"] or {}).get("upload")]
        assert [r["detail"]["path"] for r in commits] == ["libp2p", "libp2p"], commits

        cn = control(sn.net.home("n0"), "status")["counters"]
        cc = control(sn.net.home("coord"), "status")["counters"]
        assert cn.get("lane.fallback.connect") == 2 and sn.nodes["n0"].log_text().count("lane_fallback") == 2
        assert not cc.get("lane.accepted"), cc
        assert cc.get("bytes.cs.in", 0) >= sum(r["bytes"]["bundle_out"] for r in uploads)
        for name, c in (("n0", cn), ("coord", cc)):
            bad = [k for k in c if k.startswith(("reject.", "error.", "cs.upload."))]
            assert not bad, (name, {k: c[k] for k in bad})
    finally:
        sn.close()
        closed.close()
