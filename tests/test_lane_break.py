"""Issue 9: a lane transfer that breaks mid-transfer, real daemons (`--test-faults break@send|recv`).

The model's blocks are 1 MiB + 2 KiB (`hidden = 512`), so a break after 500 kB stops inside the first layer,
after its first 1 MiB chunk has been written to the receiver's partial file. Every daemon has
`lane_min_mb = 0`, so every bundle takes the lane, including the retry. The retry goes to the same node
(P2P: the sender re-proposes hop 1 as attempt 1; CS: the node uploads again) and resumes over the lane from
the partial offset: the retry moves fewer bytes than the whole bundle, the job completes with a valid hop log
and the receiver's store holds only blobs that hash to their names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import control
from snakenet import SnakeNet, job_toml

from snakenode.layers.store import sha256_hex
from snakenode.snake import hoplog

BIG = "[model_args]\nhidden = 512\n"  # blocks of 512x512 float32 + bias: 1 MiB + 2 KiB each
BREAK_AT = 500_000


def _store_is_sound(home: Path) -> None:
    blobs = list((home / "store" / "blobs").glob("*.safetensors"))
    assert blobs and all(sha256_hex(b.read_bytes()) == b.stem for b in blobs)


def _bad_counters(c: dict[str, int]) -> list[str]:
    return [k for k in c if k.startswith(("error.", "lane.fallback."))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["recv", "send"])
def test_p2p_lane_broken_mid_transfer_resumes_over_the_lane(tmp_path: Path, side: str) -> None:
    """recv: the receiver n1 breaks the lane; send: the sender n0 does. Either way the retry of hop 1 goes
    to n1 again, over a new lane offer, from the partial file's offset."""
    sn = SnakeNet(tmp_path, network=f"lanebreak{side}")
    try:
        sn.net.env["SNAKENODE_LANE_MIN_MB"] = "0"
        fault = ["--test-faults", f"break@{side}:hop=1:after_bytes={BREAK_AT}"]
        sn.add_node("n0", "0/2", extra=fault if side == "send" else None)
        sn.add_node("n1", "1/2", extra=fault if side == "recv" else None)
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=1, epochs=1, extra=BIG))
        detail = sn.wait_complete(job_id, 45)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        ids = sn.ids

        acc = sorted((r for r in records if r["event"] == "accepted" and r["hop"] == 1), key=lambda r: r["attempt"])
        assert [r["holder"] for r in acc] == [ids["n1"], ids["n1"]], "the same node gets the next attempt"
        first, second = acc[0]["detail"], acc[1]["detail"]
        full = first["planned_bytes"]
        assert full > 2 * 2**20 and first["resumed_bytes"] == 0
        # The retry resumes inside the broken layer: at least the first chunk was kept, and is not sent again.
        assert 2**20 <= second["resumed_bytes"] < full, second
        assert second["planned_bytes"] == full - second["resumed_bytes"], (first, second)
        retry = [r for r in records if r["event"] == "retry" and r["hop"] == 1]
        assert retry and retry[0]["detail"]["why"] == "transfer"

        # Only the retry was handed off (the broken attempt never committed), over the lane, with the rest.
        handoffs = [r for r in records if r["event"] == "handoff" and r["hop"] == 1]
        assert [(r["attempt"], r["detail"]) for r in handoffs] == [(1, {"path": "lane"})], handoffs
        assert handoffs[0]["bytes"]["bundle_out"] == second["planned_bytes"] < full
        got = [r for r in records if r["event"] == "received" and r["hop"] == 1]
        assert [(r["attempt"], r["holder"], r["detail"]["path"]) for r in got] == [(1, ids["n1"], "lane")]
        assert got[0]["bytes"]["bundle_in"] == second["planned_bytes"]

        c0 = control(sn.net.home("n0"), "status")["counters"]
        c1 = control(sn.net.home("n1"), "status")["counters"]
        assert c1.get("lane.accepted") == 2, c1  # both attempts authenticated on n1's lane
        assert c0.get("snake.transfer.failed") == 1, c0
        rejects = {k: v for k, v in c1.items() if k.startswith("reject.lane.")}
        # recv: n1's own fault; send: n0 cut the connection, n1 saw the lane end mid-layer (EOF: truncated; a
        # TCP reset: broken).
        assert rejects in (({"reject.lane.test_fault": 1},) if side == "recv" else
                           ({"reject.lane.truncated": 1}, {"reject.lane.broken": 1})), rejects
        # The broken attempt's bytes moved on the lane too: both attempts together carry at least the whole
        # bundle (the kept chunk once; with recv, whatever the sender had in flight when n1 stopped reading too).
        assert c0.get("bytes.lane.out", 0) >= full
        assert not _bad_counters(c0) and not _bad_counters(c1), (c0, c1)
        _store_is_sound(sn.net.home("n1"))
    finally:
        sn.close()


@pytest.mark.timeout(60)
def test_cs_upload_broken_on_the_lane_resumes_at_the_coordinator(tmp_path: Path) -> None:
    """CS mode: the node's upload to the coordinator breaks on the lane (sender side); the node retries the
    upload, the coordinator's upload_ok names the partial offset and the retry resumes over a new lane."""
    sn = SnakeNet(tmp_path, network="lanebreakcs", submitter="coord")
    try:
        sn.net.env["SNAKENODE_LANE_MIN_MB"] = "0"
        sn.add_coordinator()
        sn.add_node("n0", "0/1", extra=["--test-faults", f"break@send:hop=0:after_bytes={BREAK_AT}"])
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=1, epochs=1, extra=BIG), mode="cs")
        detail = sn.wait_complete(job_id, 45)
        records = sn.merged_records(job_id)
        assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []
        ids = sn.ids
        assert detail["summary"]["completed"]["holder"] == ids["coord"]

        trained = [r for r in records if r["event"] == "trained" and r["holder"] == ids["n0"]]
        w = trained[0]["window"]
        assert w["end"] - w["start"] == 2, w
        uploads = [r for r in records if r["event"] == "handoff" and (r["detail"] or {}).get("upload")]
        assert [r["detail"] for r in uploads] == [{"upload": True, "to": ids["coord"], "path": "lane"}], uploads
        commits = [r for r in records if r["event"] == "committed" and (r["detail"] or {}).get("upload")]
        assert [r["detail"]["path"] for r in commits] == ["lane"]
        sent = uploads[0]["bytes"]["bundle_out"]
        assert commits[0]["bytes"]["bundle_in"] == sent
        # The upload is at least the two trained 1 MiB + 2 KiB blocks (plus stem/head when they trained, about
        # 150 kB): a retry that sent everything again would move more than 2 MiB. It resumed after the chunk.
        assert 0 < sent < 2 * 2**20, sent

        cn = control(sn.net.home("n0"), "status")["counters"]
        cc = control(sn.net.home("coord"), "status")["counters"]
        assert cn.get("cs.upload.failed") == 1, cn
        assert cc.get("lane.accepted") == 2, cc  # the broken upload and its resumption
        assert {k: v for k, v in cc.items() if k.startswith("reject.lane.")} in (
            {"reject.lane.truncated": 1}, {"reject.lane.broken": 1}), cc
        assert cc.get("bytes.lane.in", 0) >= sent + 2**20  # the broken attempt's first chunk, then the rest
        assert not _bad_counters(cn) and not _bad_counters(cc), (cn, cc)
        _store_is_sound(sn.net.home("coord"))
    finally:
        sn.close()
