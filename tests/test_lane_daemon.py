"""Issue 9 end to end: real daemons hand the snake on over the fast bulk lane, and fall back to the libp2p
stream when a receiver's lane port cannot be reached.

Three nodes with `lane_min_mb = 0` (every bundle takes the lane). n2 advertises, through
`lane_announce_port`, a port that is bound by this test but not listening (connection refused: what a
firewall or a NAT without forwarding looks like to the sender). Two laps: every node receives the snake at
least once; n0 and n1 over the lane, n2 over libp2p after a logged, counted fallback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import control
from snakenet import SnakeNet, job_toml

from snakenode.snake import hoplog


@pytest.fixture(scope="module")
def lanes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SnakeNet, str, dict[str, Any]]]:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connecting to it is refused
    dead_port = closed.getsockname()[1]
    sn = SnakeNet(tmp_path_factory.mktemp("lane"), network="lane")
    try:
        for i in range(3):
            name = f"n{i}"
            home = sn.net.home(name)
            sn.make_identity(name)
            toml = "lane_min_mb = 0\n" + (f"lane_announce_port = {dead_port}\n" if name == "n2" else "")
            (home / "snakenode.toml").write_text(toml)
            sn.add_node(name, f"{i}/3")
        sn.wait_ready()
        job_id = sn.submit(job_toml(laps=2, epochs=1))
        detail = sn.wait_complete(job_id, 45)
        yield sn, job_id, detail
    finally:
        sn.close()
        closed.close()


@pytest.mark.timeout(90)
def test_bundles_go_over_the_lane_and_fall_back_when_it_is_unreachable(
        lanes: tuple[SnakeNet, str, dict[str, Any]]) -> None:
    sn, job_id, detail = lanes
    ids = sn.ids
    assert detail["summary"]["completed"]["lap"] == 2
    records = sn.merged_records(job_id)
    assert hoplog.validate_log(records, detail["summary"]["blocks"]) == []

    # Every node listens on a lane and says where (node.json and its gossiped profile).
    ports = {}
    for name, p in sn.nodes.items():
        info = p.node_json()
        assert info is not None and isinstance(info["lane_port"], int) and info["lane_port"] > 0
        ports[name] = info["lane_port"]
    seen = {r["peer_id"]: r["profile"] for r in control(sn.net.home("n0"), "peers")}
    assert seen[ids["n1"]]["lane_port"] == ports["n1"]

    # The hand-offs: to n0/n1 over the lane, to n2 over libp2p after a connect failure on the lane.
    handoffs = [r for r in records if r["event"] == "handoff"]
    to_lane = [r for r in handoffs if r["holder"] in (ids["n0"], ids["n1"])]
    to_n2 = [r for r in handoffs if r["holder"] == ids["n2"]]
    assert to_lane and to_n2, [(sn.name_of(r["holder"]), r["detail"]) for r in handoffs]
    for r in to_lane:
        assert r["detail"] == {"path": "lane"}, r
        assert r["bytes"]["bundle_out"] > 0
    for r in to_n2:
        assert r["detail"] == {"path": "libp2p", "fallback": "connect"}, r
        assert r["bytes"]["bundle_out"] > 0
    received = {(r["holder"], r["hop"], r["attempt"]): r["detail"]["path"] for r in records
                if r["event"] == "received" and (r["detail"] or {}).get("path")}
    for r in to_lane:
        assert received[(r["holder"], r["hop"], r["attempt"])] == "lane"
    for r in to_n2:
        assert received[(r["holder"], r["hop"], r["attempt"])] == "libp2p"

    # Counters: the bytes of the lane hand-offs moved on the lane, the fallbacks were counted.
    counters = {n: control(p.home, "status")["counters"] for n, p in sn.nodes.items()}
    lane_in = {n: c.get("bytes.lane.in", 0) for n, c in counters.items()}
    for name in ("n0", "n1"):
        got = sum(r["bytes"]["bundle_out"] for r in to_lane if r["holder"] == ids[name])
        assert lane_in[name] >= got, (name, lane_in[name], got)
        assert counters[name].get("lane.accepted", 0) == sum(1 for r in to_lane if r["holder"] == ids[name])
    assert not counters["n2"].get("lane.accepted")  # n2 sends on lanes (bytes.lane.in: acks), never receives
    assert sum(c.get("lane.fallback.connect", 0) for c in counters.values()) == len(to_n2)
    assert sum(c.get("bytes.lane.out", 0) for c in counters.values()) >= sum(
        r["bytes"]["bundle_out"] for r in to_lane)
    for c in counters.values():
        assert not [k for k in c if k.startswith(("reject.lane.", "error.lane.", "error.handler"))], c
    # The senders said why they fell back.
    fallbacks = sum(p.log_text().count("lane_fallback") for p in sn.nodes.values())
    assert fallbacks == len(to_n2)


@pytest.mark.timeout(40)
def test_a_node_without_a_lane_says_so_in_node_json(tmp_path: Path) -> None:
    """lane_port = -1: no listener, node.json's lane_port is null, and bundles to it go over libp2p."""
    sn = SnakeNet(tmp_path, network="nolane")
    try:
        sn.make_identity("n0")
        (sn.net.home("n0") / "snakenode.toml").write_text("lane_port = -1\n")
        sn.add_node("n0", "0/1")
        info = sn.nodes["n0"].wait_ready()
        assert "lane_port" in info and info["lane_port"] is None
        assert "lane_port" not in control(sn.net.home("n0"), "status")["profile"]
    finally:
        sn.close()


def test_negotiate_lane_fields_round_trip_and_stay_optional() -> None:
    """propose.lane / accept.lane survive the codec; absent or of an unknown version they mean "no lane"."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from snakenode import identity, wire
    from snakenode.net import lane
    from snakenode.snake import state as state_mod
    from snakenode.snake.messages import Accept, Propose

    peers = [identity.Identity(Ed25519PrivateKey.generate()).peer_id for _ in range(2)]
    st0 = state_mod.start_job("0123456789abcdef", peers, peers[0], 2, 4)
    cert = lane.LaneCert.generate()
    p = Propose("0123456789abcdef", b"job", st0, 2, {"stem": "a" * 64}, cert.der)
    got = Propose.from_wire(wire.Fields(wire.unpackb(wire.packb(p.to_wire())), "propose"))
    assert got.lane == cert.der
    offer = lane.LaneOffer(4002, "lane-" + "ab" * 16, b"\x07" * 32, lane.LaneCert.generate().der)
    a = Accept("0123456789abcdef", 0, 0, 2, [], {}, offer)
    assert Accept.from_wire(wire.Fields(wire.unpackb(wire.packb(a.to_wire())), "accept")).lane == offer
    for msg, cls in ((p.to_wire(), Propose), (a.to_wire(), Accept)):
        bare = {k: v for k, v in msg.items() if k != "lane"}
        assert cls.from_wire(wire.Fields(bare, "m")).lane is None
        newer = {**msg, "lane": {**msg["lane"], "v": 2}}
        assert cls.from_wire(wire.Fields(newer, "m")).lane is None
        with pytest.raises(wire.WireError):
            cls.from_wire(wire.Fields({**msg, "lane": {"v": 1, "cert": b"not a certificate"}}, "m"))
