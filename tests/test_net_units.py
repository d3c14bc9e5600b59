"""Pure parts of the daemon: peer table, wire codec, config precedence, profile decoding, fault specs."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from snakenode import config, faults, identity, profile, wire
from snakenode.net.peers import BACKOFF_MAX_S, PeerTable, backoff

A = "12D3KooWA9hh6poLUrYh1T77zWTMcJKpsYZVudcYTJsbpC5bk1hw"


def prof(pid: str, seq: int, **extra: object) -> dict:
    return {"v": 1, "peer_id": pid, "seq": seq, "addrs": [f"/ip4/127.0.0.1/tcp/1/p2p/{pid}"], "role": "node",
            "version": "0.1.0", "network": "t", **extra}


def test_peer_table_lifecycle() -> None:
    t = PeerTable("self", ping_misses=2, profile_ttl_s=60)
    assert t.on_profile(prof(A, 5), now=0.0) == "new"
    assert t.on_profile(prof(A, 5), now=1.0) == "stale" and t.on_profile(prof(A, 4), now=1.0) == "stale"
    assert t.view(1.0) == []  # known but not connected: not live
    t.on_connected(A, 1.0)
    assert [r["peer_id"] for r in t.view(2.0)] == [A]
    assert t.on_ping_miss(A, 3.0) is False and t.on_ping_miss(A, 3.5) is True
    assert t.view(4.0) == [] and t.get(A).down_reason == "unresponsive"
    assert t.on_profile(prof(A, 6), now=5.0) == "updated"
    assert not t.get(A).down and t.get(A).next_dial == 5.0  # a newer profile is a sign of life
    t.on_connected(A, 6.0)
    assert t.on_disconnected(A, 7.0) is True and t.view(7.0) == []
    assert t.expire(7.0 + 61) == [] and t.expire(7.0 + 601) == [A]  # recently live peers stay dialable


def test_peer_table_never_lists_itself_and_dials_with_backoff() -> None:
    t = PeerTable("self")
    assert t.on_profile(prof("self", 1), 0.0) == "stale"
    t.on_profile(prof(A, 1), 0.0)
    assert [e.peer_id for e in t.to_dial(0.0, 64)] == [A]
    d1 = t.on_dial_failed(A, 0.0)
    assert t.to_dial(0.0, 64) == [] and 0.4 <= d1 <= 0.6
    assert [e.peer_id for e in t.to_dial(d1 + 0.01, 64)] == [A]
    assert max(backoff(A, n) for n in range(1, 30)) <= BACKOFF_MAX_S * 1.2
    assert t.to_dial(100.0, 0) == []  # max_peers reached


def test_wire_fields_name_the_bad_field() -> None:
    f = wire.Fields({"a": 1, "b": "x" * 10, "n": float("nan")}, "msg")
    assert f.int("a", 0, 5) == 1
    with pytest.raises(wire.WireError, match=r"msg\.a must be an integer in \[2, 5\]"):
        f.int("a", 2, 5)
    with pytest.raises(wire.WireError, match=r"msg\.b must be a string of at most 3"):
        f.str("b", 3)
    with pytest.raises(wire.WireError, match=r"msg\.n must be a finite number"):
        f.float("n")
    with pytest.raises(wire.WireError, match=r"msg\.missing is missing"):
        f.str("missing")


def test_wire_unpack_refuses_ext_oversize_and_garbage() -> None:
    ext = msgpack.packb(msgpack.ExtType(5, b"x"))
    with pytest.raises(wire.WireError):
        wire.unpackb(ext)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.unpackb(b"\x90" * 100, limit=10)
    with pytest.raises(wire.WireError):
        wire.unpackb(b"\xc1")
    assert wire.packb({"b": 1, "a": 2}) == wire.packb({"a": 2, "b": 1})


def test_config_precedence_and_errors(tmp_path: Path) -> None:
    (tmp_path / "snakenode.toml").write_text('network = "fromfile"\nping_misses = 3\n')
    cfg = config.load(tmp_path, {"ping_misses": None}, env={"SNAKENODE_NETWORK": "fromenv"})
    assert cfg.network == "fromenv" and cfg.ping_misses == 3
    assert cfg.sources["network"] == "$SNAKENODE_NETWORK"
    cfg = config.load(tmp_path, {"network": "fromflag"}, env={"SNAKENODE_NETWORK": "fromenv"})
    assert cfg.network == "fromflag"
    with pytest.raises(config.ConfigError, match="'role' .* must be one of node, coordinator, bootstrap"):
        config.load(tmp_path, {"role": "king"}, env={})
    with pytest.raises(config.ConfigError, match="trusted_submitters"):
        config.load(tmp_path, {"trusted_submitters": ["nope"]}, env={})
    ok = identity.Identity(identity.Ed25519PrivateKey.generate()).peer_id
    assert config.load(tmp_path, {"trusted_submitters": [ok]}, env={}).trusted_submitters == [ok]


def test_profile_decode_is_strict_but_tolerates_new_fields() -> None:
    p = profile.decode({**prof(A, 1), "future_field": {"x": 1}, "data": {
        "dataset": "digits", "task": "classification", "samples": 10, "num_classes": 2, "label_hist": [4, 6],
        "fingerprint": "ab"}})
    assert p["data"]["label_hist"] == [4, 6] and "future_field" not in p
    with pytest.raises(wire.WireError, match="profile.role"):
        profile.decode({**prof(A, 1), "role": "admin"})
    with pytest.raises(wire.WireError, match="profile.data.samples"):
        profile.decode({**prof(A, 1), "data": {"dataset": "d", "task": "lm", "samples": -1}})


def test_fault_specs() -> None:
    items, rate = faults.parse("exit@recv:after_bytes=100000, stop@train:hop=3;rate=1MB/s")
    assert [(f.action, f.phase, f.params) for f in items] == [
        ("exit", "recv", {"after_bytes": 100000}), ("stop", "train", {"hop": 3})]
    assert rate == 1e6 and faults.parse_rate("8Mbit/s") == 1e6
    f = faults.Faults("decline@accept:times=2")
    assert [f.check("accept", hop=1) for _ in range(3)] == ["decline", "decline", None]
    for bad in ("explode@recv", "exit@nowhere", "exit@recv:after_bytes=lots", "exit@recv:colour=red", "rate=fast"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse(bad)


def test_identity_peer_ids_round_trip(tmp_path: Path) -> None:
    ident = identity.load_or_create(tmp_path)
    assert identity.load(tmp_path).peer_id == ident.peer_id and ident.peer_id.startswith("12D3KooW")
    sig = ident.sign(b"msg")
    assert identity.verify(ident.peer_id, b"msg", sig) and not identity.verify(ident.peer_id, b"msh", sig)
    assert identity.b58decode(identity.b58encode(b"\0\0abc")) == b"\0\0abc"
    with pytest.raises(ValueError):
        identity.public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
