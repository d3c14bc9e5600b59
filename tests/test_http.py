"""Issue 17 end to end: a real node's HTTP side during a real job.

One network (bootstrap + two nodes, hops stretched by compute_slowdown, a 16-hop job) serves every
test here: /metrics parsed by prometheus_client's own parser with byte counters growing while the snake
moves; /api/jobs equal to `snakenode jobs --json`; the dashboard loaded in headless Chromium during the job,
its rendered DOM checked (one row per peer, the holder highlighted, the hop count rising) and a screenshot
taken. Pure parts (address parsing, hand-off phase timings, counter names) are tested at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import Dom, dump_dom, screenshot
from harness import control, run_cli, wait_for
from snakenet import SnakeNet, job_toml

from snakenode.http.address import HttpAddressError, parse_address
from snakenode.http.metrics import parse, split_counter
from snakenode.http.timings import Timings

pytestmark = pytest.mark.timeout(170)


class World:
    def __init__(self, sn: SnakeNet, url: str, before: str) -> None:
        self.sn = sn
        self.url = url
        self.metrics_before = before
        self.job_id = ""

    def get(self, path: str, method: str = "GET", host: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method)
        if host:
            req.add_header("Host", host)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def trained_hops(self) -> int:
        return sum(1 for r in self.json(f"/api/jobs/{self.job_id}")["records"] if r["event"] == "trained")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sn = SnakeNet(tmp_path_factory.mktemp("http"), network="http")
    try:
        for i in range(2):
            sn.add_node(f"n{i}", f"{i}/2", extra=["--compute-slowdown", "4"])
        sn.wait_ready()
        url = sn.nodes["n0"].node_json()["http_url"]
        assert url.startswith("http://127.0.0.1:"), url
        w = World(sn, url, "")
        w.metrics_before = w.get("/metrics")[1].decode()
        w.job_id = sn.submit(job_toml(laps=8, epochs=2))  # 16 hops: still running when the browser looks
        yield w
    finally:
        sn.close()


def _bytes(text: str, protocol: str, direction: str) -> float:
    return sum(v for labels, v in parse(text).get("snakenode_bytes_total", [])
               if labels == {"protocol": protocol, "direction": direction})


def test_metrics_parse_and_byte_counters_grow_during_a_job(world: World) -> None:
    before = parse(world.metrics_before)
    assert before["snakenode_peers_up"][0][1] >= 1  # n1 (the bootstrap peer advertises no profile)

    def handed_on_and_received() -> bool:
        own = [r["event"] for r in world.json(f"/api/jobs/{world.job_id}")["records"]
               if r["node"] == world.sn.ids["n0"]]
        return "committed" in own and "received" in own and own.count("train_start") >= 2

    wait_for(handed_on_and_received, 90, "n0 to hand the snake on and receive it back", world.sn.net.logs)
    status, body = world.get("/metrics")
    assert status == 200
    text = body.decode()
    after = parse(text)
    moved = sum(_bytes(text, p, "out") + _bytes(text, p, "in") for p in ("bundle", "lane"))
    assert moved > sum(_bytes(world.metrics_before, p, d) for p in ("bundle", "lane") for d in ("in", "out"))
    assert _bytes(text, "gossip.progress", "out") > _bytes(world.metrics_before, "gossip.progress", "out")
    assert after["snakenode_event_loop_lag_seconds_count"][0][1] > 10  # sampling since the node started
    assert after["snakenode_hop_train_seconds_count"][0][1] >= 1
    assert after["snakenode_hops_trained_total"][0][1] >= 1
    phases = {lb["phase"]: v for lb, v in after["snakenode_handoff_phase_seconds_count"]}
    assert phases["decide"] >= 1 and phases["negotiate"] >= 1 and phases["transfer"] >= 1, phases
    assert phases["load"] >= 1, phases
    # The daemon never imports torch, HTTP side included.
    maps = Path(f"/proc/{world.sn.nodes['n0'].pid}/maps").read_text()
    assert "libtorch" not in maps


def test_dashboard_in_headless_chromium_during_the_job(world: World, tmp_path: Path) -> None:
    peers = {r["peer_id"] for r in control(world.sn.net.home("n0"), "peers")} | {world.sn.ids["n0"]}
    first = Dom(dump_dom(world.url + "/"))
    assert first.by_id("job-section") and first.select("body")[0].attrs.get("data-ready") == "true"
    hops_first = int(first.by_id("hop-count").attrs["data-hops"])
    rows = first.select("tr", "peer")
    assert sorted(r.attrs["data-peer"] for r in rows) == sorted(peers), "one row per peer (and this node)"
    target = hops_first + 2
    wait_for(lambda: world.trained_hops() >= target, 90, f"{target} trained hops", world.sn.net.logs)
    shot = screenshot(world.url + "/", tmp_path / "dashboard.png")
    second = Dom(dump_dom(world.url + "/"))
    hops_second = int(second.by_id("hop-count").attrs["data-hops"])
    assert hops_second >= target > hops_first, (hops_first, hops_second)
    cells, pending = second.select("div", "hop"), second.select("div", "pending")
    assert len(cells) - len(pending) == hops_second and len(pending) <= 1  # a cell per hop, trained or training
    status = second.by_id("job-status").text
    holder = second.by_id("job-holder").attrs["title"]
    assert holder in peers
    highlighted = [r.attrs["data-peer"] for r in second.select("tr", "holder")]
    assert highlighted == [holder], (highlighted, holder)
    if status.startswith("running"):
        current = second.select("div", "current")
        assert [c.attrs["data-holder"] for c in current] == [holder]
    assert shot.stat().st_size > 10_000
    phone = screenshot(world.url + "/", tmp_path / "phone.png", width=390, height=1400)
    assert phone.stat().st_size > 10_000
    keep = os.environ.get("SNAKENODE_KEEP_SCREENSHOT")  # docs/dashboard.png is refreshed this way
    if keep:
        shutil.copy(shot, keep)


def test_api_documents_are_the_control_socket_views_and_read_only(world: World) -> None:
    world.sn.wait_complete(world.job_id, 120)
    home = str(world.sn.net.home("n0"))

    def same() -> bool:
        r = run_cli("jobs", "--json", "--home", home)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) == world.json("/api/jobs")

    wait_for(same, 20, "/api/jobs to equal `snakenode jobs --json`", world.sn.net.logs)
    peers = run_cli("peers", "--json", "--home", home)
    assert {r["peer_id"] for r in json.loads(peers.stdout)} == {r["peer_id"] for r in world.json("/api/peers")}
    assert world.json("/api/status")["peer_id"] == world.sn.ids["n0"]
    detail = world.json(f"/api/jobs/{world.job_id}")
    assert detail["summary"]["status"] == "complete" and detail["total"] == len(detail["records"])
    assert world.json(f"/api/jobs/{world.job_id}?since={detail['total']}")["records"] == []
    assert world.get("/api/jobs/0123456789abcdef")[0] == 404
    assert world.get("/api/jobs", method="POST")[0] == 405
    assert world.get("/api/status", host="attacker.example")[0] == 421  # DNS rebinding gets nothing
    status, page = world.get("/")
    assert status == 200 and b"/static/app.js" in page and b"http://" not in page.split(b"<footer")[0]
    assert world.get("/static/app.js")[0] == 200 and world.get("/static/../pyproject.toml")[0] == 404


def test_http_off_and_bad_addresses(tmp_path: Path) -> None:
    from harness import Net

    net = Net(tmp_path, network="httpoff")
    try:
        p = net.start_node("off", data=None, extra=["--http", "off"])
        assert p.wait_ready()["http_url"] is None
    finally:
        net.close()
    r = run_cli("start", "--home", str(tmp_path / "bad"), "--http", "localhost:80")
    assert r.returncode == 1 and "not an IP address" in r.stderr


def test_address_parsing() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("off") is None
    for bad in ("9464", "127.0.0.1", "127.0.0.1:99999", "example.com:80", ":80"):
        with pytest.raises(HttpAddressError):
            parse_address(bad)


def test_counter_names_map_to_prometheus_families() -> None:
    assert split_counter("bytes.gossip.jobs.out") == ("bytes", {"protocol": "gossip.jobs", "direction": "out"})
    assert split_counter("bytes.bundle.in") == ("bytes", {"protocol": "bundle", "direction": "in"})
    assert split_counter("reject.bundle.hash_mismatch") == ("rejections", {"protocol": "bundle",
                                                                           "kind": "hash_mismatch"})
    assert split_counter("error.handler.negotiate") == ("errors", {"kind": "handler.negotiate"})
    assert split_counter("lane.fallback.refused") == ("events", {"kind": "lane.fallback.refused"})


def _rec(event: str, node: str, t: float, lineage: str, parent: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"event": event, "node": node, "t": t, "lineage": lineage, "parent_lineage": parent, **kw}


def test_handoff_phases_come_from_the_nodes_own_records_once() -> None:
    me, other = "A", "B"
    recs = [
        _rec("received", me, 9.0, "L1", "L0", t_recv=9.0),
        _rec("train_start", me, 9.5, "L1", "L0", t_train_start=9.5),
        _rec("trained", me, 12.0, "L1", "L0", t_train_start=9.5, t_train_end=12.0),
        _rec("proposed", me, 12.25, "L2x", "L1"),        # first candidate declines
        _rec("declined", me, 13.0, "L2x", "L1"),
        _rec("proposed", me, 13.5, "L2", "L1"),
        _rec("accepted", me, 13.75, "L2", "L1"),
        _rec("trained", other, 20.0, "L2", "L1", t_train_start=14.0, t_train_end=20.0),  # not ours
        _rec("committed", me, 15.0, "L2", "L1"),
    ]
    timings = Timings(me)
    got = list(timings.feed(recs[:5])) + list(timings.feed(recs[5:]))
    assert got == [("phase", "load", 0.5), ("train", "", 2.5), ("phase", "decide", 0.25),
                   ("outcome", "declined", 1.0), ("phase", "negotiate", 0.25), ("outcome", "committed", 1.0),
                   ("phase", "transfer", 1.25)]
