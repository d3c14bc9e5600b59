"""Hop log: records, JSONL files, merging several nodes' logs, and whole-log validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from snakenode.identity import Identity
from snakenode.snake import hoplog, job
from snakenode.snake.hoplog import HopLogError, append_record, from_state, merge, read_log, validate_log
from snakenode.snake.state import after_hop, finish_hop, job_done, retry, start_job
from snakenode.snake.window import Window, check_sequence


def peer(i: int) -> str:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)).peer_id


A, B, C, D = (peer(i) for i in range(1, 5))
JOB = "feedfacecafebeef"
BLOCKS = 6
SPEC = job.validate_spec({"model": "mlp", "dataset": "digits", "laps": 2})
ISSUE_FIELDS = {"job_id", "event", "hop", "attempt", "lineage", "lap", "holder", "prev_holder", "window",
                "trained", "metrics_before", "metrics_after", "bytes", "t_recv", "t_train_start",
                "t_train_end", "t_handoff"}
ISSUE_EVENTS = {"received", "train_start", "trained", "handoff", "committed", "retry", "reassigned",
                "superseded", "declined", "dropped", "lap_complete", "job_complete", "resumed"}


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self, dt: float = 0.5) -> float:
        self.t += dt
        return self.t


def simulate(tmp_path: Path) -> dict[str, Path]:
    """A 2-lap job over 4 nodes as real nodes would log it, one JSONL file per node. At hop 3 the
    successor (C) dies while training; its predecessor retries the hop to D; C later restarts, learns it
    was superseded and logs that."""
    members = [A, B, C, D]
    paths = {p: tmp_path / f"{p[-6:]}.jsonl" for p in members}
    now = Clock()
    sizes = iter([2, 3, 2, 1, 2, 2, 3, 1, 2, 2, 1, 2])
    order = iter([B, C, D, A, B, C, D, A, B, C])
    s = start_job(JOB, members, A, next(sizes), BLOCKS)

    def log(node: str, event: str, st: object, **kw: object) -> None:
        append_record(paths[node], from_state(event, st, node=node, t=now(), **kw))  # type: ignore[arg-type]

    while True:
        h = s.holder
        t_recv = now()
        log(h, "received", s, t_recv=t_recv, bytes={"bundle_in": 1000 + s.hop})
        t0 = now()
        log(h, "train_start", s, t_train_start=t0)
        t1 = now(3.0)
        log(h, "trained", s, trained={"stem": True, "head": True}, metrics_before={"accuracy": 0.5},
            metrics_after={"accuracy": 0.6 + 0.01 * s.hop, "loss": 1.0}, t_recv=t_recv, t_train_start=t0,
            t_train_end=t1)
        lap_before = s.lap
        s = finish_hop(s, metric=0.6 + 0.01 * s.hop, members=members)
        if s.lap != lap_before:
            log(h, "lap_complete", s, detail={"metric": s.lap_metrics[-1]})
        if job_done(s, SPEC):
            log(h, "job_complete", s)
            return paths
        nxt = after_hop(s, next(order), next(sizes), spec=SPEC)
        log(h, "proposed", nxt, bytes={"negotiate": 300})
        log(h, "accepted", nxt)
        log(h, "handoff", nxt, t_handoff=now(), bytes={"bundle_out": 5000})
        log(h, "committed", nxt)
        if nxt.hop == 3 and nxt.attempt == 0:
            lost = nxt
            log(lost.holder, "received", lost, t_recv=now())
            log(lost.holder, "train_start", lost, t_train_start=now())
            nxt = retry(s, lost, D, lost.window.size, spec=SPEC)      # C's baton lease lapsed
            log(h, "retry", nxt, detail={"failed_holder": lost.holder})
            log(h, "handoff", nxt, t_handoff=now(), bytes={"bundle_out": 5000})
            log(h, "committed", nxt)
            log(lost.holder, "resumed", lost)
            log(lost.holder, "superseded", lost, detail={"by": nxt.lineage})
        s = nxt


def merged(paths: dict[str, Path]) -> list[dict]:
    return merge(*(read_log(p) for p in paths.values()))


# ---------------------------------------------------------------------------------------------- records


def test_record_has_every_field_issue_4_lists() -> None:
    s = start_job(JOB, [A, B], A, 2, BLOCKS)
    rec = from_state("trained", s, node=A, t=1.0, trained={"stem": True, "head": False},
                     metrics_after={"accuracy": 0.9}, t_train_start=1.0, t_train_end=2.0)
    assert ISSUE_FIELDS <= set(rec)
    assert rec["window"] == {"start": 0, "end": 2, "dir": 1}
    assert rec["bytes"] == {"bundle_in": 0, "bundle_out": 0, "negotiate": 0, "gossip": 0}
    assert ISSUE_EVENTS <= set(hoplog.EVENTS)
    json.dumps(rec, allow_nan=False)


def test_validate_record_names_each_problem() -> None:
    s = start_job(JOB, [A, B], A, 2, BLOCKS)
    good = from_state("received", s, node=A, t=1.0)
    assert hoplog.validate_record(good) == []
    cases = {
        "missing keys": {k: v for k, v in good.items() if k != "bytes"},
        "event": {**good, "event": "exploded"},
        "hop must be": {**good, "hop": -1},
        "attempt must be": {**good, "attempt": True},
        "lineage must be": {**good, "lineage": "abc"},
        "node must be a peer id": {**good, "node": "x"},
        "t must be": {**good, "t": float("nan")},
        "window must have": {**good, "window": {"start": 2, "end": 1, "dir": 1}},
        "trained must be": {**good, "trained": {"stem": 1, "head": True}},
        "metrics_after must map": {**good, "metrics_after": {"acc": "high"}},
        "bytes must be": {**good, "bytes": {**good["bytes"], "gossip": -1}},
        "times must not decrease": {**good, "t_recv": 5.0, "t_train_start": 4.0},
        "a trained record needs metrics_after": {**good, "event": "trained"},
        "lineage does not match": {**good, "holder": B},
        "record is not a map": [],
    }
    for needle, rec in cases.items():
        problems = hoplog.validate_record(rec)
        assert any(needle in p for p in problems), (needle, problems)
    assert hoplog.validate_record({**good, "new_field_from_a_newer_node": 1}) == []
    with pytest.raises(HopLogError, match="event"):
        from_state("exploded", s, node=A, t=1.0)


# ---------------------------------------------------------------------------------------------- files


def test_jsonl_round_trip_and_a_torn_last_line(tmp_path: Path) -> None:
    s = start_job(JOB, [A, B], A, 2, BLOCKS)
    path = tmp_path / "hops.jsonl"
    recs = [from_state(e, s, node=A, t=float(i)) for i, e in enumerate(["received", "train_start"])]
    for r in recs:
        append_record(path, r)
    assert read_log(path) == recs
    with open(path, "a") as f:
        f.write('{"job_id": "feedfacecafebeef", "ev')          # a crash in the middle of a write
    assert read_log(path) == recs
    with pytest.raises(HopLogError, match=r"hops.jsonl:3"):
        read_log(path, strict=True)
    with pytest.raises(HopLogError, match="invalid record"):
        append_record(path, {**recs[0], "hop": -5})


def test_merge_dedupes_and_orders(tmp_path: Path) -> None:
    paths = simulate(tmp_path)
    logs = [read_log(p) for p in paths.values()]
    once = merge(*logs)
    assert merge(*logs, *logs) == once                          # the same log read twice
    assert len(once) == sum(len(x) for x in logs)
    keys = [(r["hop"], r["attempt"], r["t"]) for r in once]
    assert keys == sorted(keys)
    assert merge(list(reversed(once))) == once


# ---------------------------------------------------------------------------------------------- whole logs


def test_a_real_run_with_a_retry_and_a_superseded_branch_validates(tmp_path: Path) -> None:
    records = merged(simulate(tmp_path))
    assert validate_log(records, BLOCKS) == []
    events = {r["event"] for r in records}
    assert {"retry", "superseded", "resumed", "lap_complete", "job_complete"} <= events
    chain = hoplog.surviving_chain(records)
    assert [g[0]["hop"] for g in chain] == list(range(len(chain)))
    hop3 = [r for r in chain[3] if r["event"] == "trained"]
    assert hop3[0]["attempt"] == 1 and hop3[0]["holder"] == D
    windows = hoplog.chain_windows(records)
    assert windows[:4] == [Window(0, 2), Window(2, 3), Window(4, 2, -1), Window(3, 1, -1)]
    assert check_sequence(windows, BLOCKS) == []                # type: ignore[arg-type]
    laps = sorted({r["lap"] for g in chain for r in g if r["event"] == "trained"})
    assert laps == [0, 1]


def _trained(records: list[dict], hop: int) -> dict:
    chain = hoplog.surviving_chain(records)
    return next(r for r in chain[hop] if r["event"] == "trained")


def test_validate_log_catches_broken_runs(tmp_path: Path) -> None:
    records = merged(simulate(tmp_path))
    # a window off the serpentine
    bad = [dict(r) for r in records]
    victim = _trained(bad, 4)
    for r in bad:
        if r["lineage"] == victim["lineage"] and r["event"] in ("trained", "train_start"):
            r["window"] = {"start": 4, "end": 6, "dir": -1}
    problems = validate_log(bad, BLOCKS)
    assert any(p.startswith("hop 4: window [4,6)<") for p in problems), problems
    half = [dict(r) for r in records]
    for r in half:
        if r["lineage"] == victim["lineage"] and r["event"] == "train_start":
            r["window"] = {"start": 4, "end": 6, "dir": -1}
    assert any("disagree on the window" in p for p in validate_log(half, BLOCKS))
    # the superseded branch claims completion too
    lost = next(r for r in records if r["event"] == "superseded")
    two_ends = [*records, {**lost, "event": "job_complete", "t": lost["t"] + 1}]
    assert any("2 lineages reached job_complete" in p for p in validate_log(two_ends, BLOCKS))
    # a hop missing from every log
    gone = _trained(records, 5)["lineage"]
    holes = [r for r in records if r["lineage"] != gone]
    assert any("traced back only to hop 6" in p for p in validate_log(holes, BLOCKS))
    # a record whose holder was rewritten
    forged = [dict(r) for r in records]
    forged[7]["holder"] = D if forged[7]["holder"] != D else A
    assert any("lineage does not match" in p for p in validate_log(forged, BLOCKS))
    # two jobs mixed
    other = [{**r, "job_id": "0000000000000000", "parent_lineage": None} for r in records[:2]]
    assert any("mixes 2 jobs" in p for p in validate_log([*records, *other], BLOCKS))
    # a trained record dropped from the completed lineage
    no_train = [r for r in records if not (r["event"] == "trained" and r["hop"] == 2)]
    assert any("have no trained record" in p for p in validate_log(no_train, BLOCKS))


def test_a_partial_log_is_checked_from_where_it_starts(tmp_path: Path) -> None:
    records = merged(simulate(tmp_path))
    tail = [r for r in records if r["hop"] >= 5 and r["event"] != "job_complete"]
    assert validate_log(tail, BLOCKS) == []
    assert validate_log([], BLOCKS) == []
