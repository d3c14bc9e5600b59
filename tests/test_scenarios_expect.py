"""Issue 21: every checker in scenarios/expect.py shown to fail. A real run only ever shows a checker
passing (or `job_completes` failing on an impossible bar), so each checker is run here over a constructed,
schema-valid hop log of a clean 2-lap run on three hosts — where it must pass — and over that log with one
thing broken — where it must fail and say why. The records are built with the hop log's own
`make_record`, lineages with the state machine's `lineage_next`, so the analysis sees what a node writes."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scenarios import analysis, expect
from snakenode.identity import Identity
from snakenode.snake import hoplog
from snakenode.snake.state import genesis_lineage, lineage_next

pytestmark = pytest.mark.timeout(30)


def peer(i: int) -> str:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)).peer_id


P = [peer(i) for i in range(1, 5)]
NAMES = dict(zip(P, "abcd", strict=True))
JOB = "feedfacecafebeef"
T0 = 1_000_000.0  # submission
HOP_S = 2.0


def rec(event: str, hop: int, holder: str, lineage: str, parent: str | None, prev: str | None, t: float,
        attempt: int = 0, node: str | None = None, **kw: Any) -> dict[str, Any]:
    return hoplog.make_record(event, job_id=JOB, hop=hop, attempt=attempt, lineage=lineage, parent_lineage=parent,
                              lap=hop // 3, holder=holder, prev_holder=prev, node=node or holder, t=t, **kw)


def hop_records(hop: int, holder: str, parent: str, prev: str | None, t: float, attempt: int = 0,
                size: int = 2, received: bool = True, trains: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """One hop attempt's records as its holder writes them: received, train_start, trained."""
    lin = lineage_next(parent, hop, attempt, holder)
    window = {"start": 0, "end": size, "dir": 1}
    out = []
    if received:
        out.append(rec("received", hop, holder, lin, parent, prev, t, attempt, t_recv=t))
    if trains:
        out.append(rec("train_start", hop, holder, lin, parent, prev, t + 0.1, attempt, window=window))
        out.append(rec("trained", hop, holder, lin, parent, prev, t + 1.0, attempt, window=window,
                       trained={"stem": True, "head": True}, metrics_after={"loss": 1.0},
                       t_train_start=t + 0.1, t_train_end=t + 1.0))
    return lin, out


def clean_run(accuracy: float = 0.9, sizes: tuple[int, ...] = (2, 3, 2, 3, 2, 3),
              hops: tuple[int, ...] = (0, 1, 2, 3, 4, 5)) -> list[dict[str, Any]]:
    """Six hops a,b,c,a,b,c; laps close at hops 2 and 5; job_complete at hop 5 with a test accuracy.
    `hops` leaves some out (each hop then names the one before it as its parent: a gap in hop numbers)."""
    records = []
    parent = genesis_lineage(JOB)
    prev = None
    for hop in hops:
        holder = P[hop % 3]
        t = T0 + 1 + hop * HOP_S
        lin, recs = hop_records(hop, holder, parent, prev, t, size=sizes[hop])
        records += recs
        if hop in (2, 5):
            records.append(rec("lap_complete", hop, holder, lin, parent, prev, t + 1.2))
        if hop == 5:
            records.append(rec("job_complete", hop, holder, lin, parent, prev, t + 1.3,
                               detail={"test": {"accuracy": accuracy, "loss": 0.3}}))
        parent, prev = lin, holder
    return records


def facts(records: list[dict[str, Any]], faults: list[analysis.FaultRecord] | None = None,
          members: tuple[str, ...] = ("a", "b", "c"), fetch: dict[str, Any] | None = None) -> expect.Facts:
    return expect.Facts(job="main", records=records, submitted_at=T0, ended_at=T0 + 30, blocks=0,
                        faults=faults or [], ready_times={n: [T0 - 10] for n in members}, members=list(members),
                        name_of=NAMES, fetch={"bytes": 1000, "layers": {"x": 1}} if fetch is None else fetch)


def kill(t: float, host: str = "b", ends: float | None = None) -> analysis.FaultRecord:
    return analysis.FaultRecord(index=0, kind="kill", target=host, hosts=[host], trigger="at_s", t=t, ends=ends)


def test_the_clean_log_passes_every_checker() -> None:
    f = facts(clean_run())
    checks = expect.evaluate({"job_completes": 60, "accuracy_at_least": 0.8, "max_hops_redone": 0,
                              "no_bundle_lost": True, "every_member_visited_each_lap": True, "one_lineage": 30,
                              "distinct_window_sizes_at_least": 2, "max_recovery_s": 5,
                              "hosts_held_the_snake": ["a", "c"]}, f)
    assert [c["name"] for c in checks if not c["ok"]] == [], checks


def test_job_completes_fails_when_late_or_never() -> None:
    records = clean_run()
    late = expect.job_completes(facts(records), 5.0)  # completes 12.3 s after submission
    assert not late["ok"] and late["value"] == 12.3, late
    never = expect.job_completes(facts([r for r in records if r["event"] != "job_complete"]), 60)
    assert not never["ok"] and "did not complete" in never["detail"], never


def test_accuracy_at_least_fails_at_chance_and_without_an_evaluation() -> None:
    chance = expect.accuracy_at_least(facts(clean_run(accuracy=0.1)), 0.6)
    assert not chance["ok"] and chance["value"] == 0.1 and "0.1000" in chance["detail"], chance
    bare = [dict(r, detail=None) if r["event"] == "job_complete" else r for r in clean_run()]
    missing = expect.accuracy_at_least(facts(bare), 0.6)
    assert not missing["ok"] and "no test accuracy" in missing["detail"], missing


def with_retry_of_hop_3(recover_after: float = 1.5) -> tuple[list[dict[str, Any]], float]:
    """Hop 3's first holder (b, attempt 0) dies while training; c retrains hop 3 as attempt 1 after
    `recover_after` s. Returns the records and the kill time."""
    records = clean_run()
    chain = hoplog.surviving_chain(records)
    hop2 = chain[2][0]
    t_kill = T0 + 1 + 3 * HOP_S + 0.3
    _, lost = hop_records(3, P[1], hop2["lineage"], P[2], T0 + 1 + 3 * HOP_S)
    lost = [r for r in lost if r["event"] != "trained"]  # killed mid-training
    # The survivor's hop 3 (a) moves later: it received after the retry.
    shifted = []
    for r in records:
        if r["hop"] >= 3:
            r = dict(r, t=r["t"] + recover_after + 0.3)
            for k in hoplog.TIME_KEYS:
                if r[k] is not None:
                    r[k] += recover_after + 0.3
        shifted.append(r)
    retry = rec("retry", 3, P[0], hop3_lineage(records), hop2["lineage"], P[2], t_kill + recover_after - 0.1,
                attempt=0, node=P[2], detail={"failed_holder": P[1], "why": "disconnect"})
    return shifted + lost + [retry], t_kill


def hop3_lineage(records: list[dict[str, Any]]) -> str:
    return str(hoplog.surviving_chain(records)[3][0]["lineage"])


def test_max_hops_redone_fails_when_a_hop_trains_twice() -> None:
    records, _ = with_retry_of_hop_3()
    r = expect.max_hops_redone(facts(records), 0)
    assert not r["ok"] and r["value"] == 1 and "hop 3: trained 2 times" in r["detail"], r
    assert "1 retry record" in r["detail"], r
    assert expect.max_hops_redone(facts(records), 1)["ok"]


def test_no_bundle_lost_fails_on_a_missing_receipt_a_gap_or_an_unfetchable_model() -> None:
    records = clean_run()
    no_receipt = [r for r in records if not (r["hop"] == 2 and r["event"] == "received")]
    r = expect.no_bundle_lost(facts(no_receipt))
    assert not r["ok"] and "hops [2]" in r["detail"] and "no received record" in r["detail"], r
    r = expect.no_bundle_lost(facts(clean_run(hops=(0, 1, 3, 4, 5))))  # hop 1 hands straight to hop 3
    assert not r["ok"] and "the surviving lineage has gaps" in r["detail"], r
    r = expect.no_bundle_lost(facts(records, fetch={"error": "no such job"}))
    assert not r["ok"] and "could not be fetched: no such job" in r["detail"], r
    r = expect.no_bundle_lost(facts(records, fetch={"bytes": 0}))
    assert not r["ok"] and "empty" in r["detail"], r


def test_no_bundle_lost_fails_on_a_log_that_does_not_validate() -> None:
    f = facts(clean_run())
    f.blocks = 6  # every hop trains from block 0: not the serpentine's window sequence over 6 blocks
    r = expect.no_bundle_lost(f)
    assert not r["ok"] and r["detail"], r


def test_every_member_visited_each_lap_fails_when_a_ready_member_is_skipped() -> None:
    r = expect.every_member_visited_each_lap(facts(clean_run(), members=("a", "b", "c", "d")))
    assert not r["ok"] and "lap 0: d never held the snake" in r["detail"], r
    # A member taken away by a fault during the lap is excused.
    excused = facts(clean_run(), members=("a", "b", "c", "d"), faults=[kill(T0, "d")])
    assert expect.every_member_visited_each_lap(excused)["ok"]
    # No lap closed at all.
    none = [r for r in clean_run() if r["event"] != "lap_complete"]
    r = expect.every_member_visited_each_lap(facts(none))
    assert not r["ok"] and "no lap completed" in r["detail"], r


def test_hosts_held_the_snake_fails_for_a_host_that_never_trained() -> None:
    r = expect.hosts_held_the_snake(facts(clean_run(), members=("a", "b", "c", "d")), ["a", "d"])
    assert not r["ok"] and r["detail"] == "never trained the snake: d" and r["value"] == 1, r


def test_one_lineage_fails_on_two_finals_and_on_a_rival_still_working() -> None:
    records = clean_run()
    chain = hoplog.surviving_chain(records)
    hop4 = chain[4][0]
    # A rival hop 5 (attempt 1, on a) also trains and completes: two job_complete lineages.
    rival_lin, rival = hop_records(5, P[0], hop4["lineage"], P[1], T0 + 12, attempt=1)
    two = records + rival + [rec("job_complete", 5, P[0], rival_lin, hop4["lineage"], P[1], T0 + 13.5,
                                 attempt=1, detail={"test": {"accuracy": 0.9}})]
    r = expect.one_lineage(facts(two), 30)
    assert not r["ok"] and "2 lineages reached job_complete" in r["detail"], r
    # A rival hop 3 trains 40 s after the fault (the losing side never stopped).
    _, late = hop_records(3, P[3], chain[2][0]["lineage"], P[2], T0 + 45, attempt=1)
    r = expect.one_lineage(facts(records + late, faults=[kill(T0 + 5, "d")]), 30)
    assert not r["ok"] and "still worked" in r["detail"] and "hop 3 on d" in r["detail"], r
    assert expect.one_lineage(facts(records + late, faults=[kill(T0 + 5, "d")]), 60)["ok"]
    r = expect.one_lineage(facts([]), 30)
    assert not r["ok"] and "no lineage made progress" in r["detail"], r


def test_distinct_window_sizes_fails_when_every_hop_takes_the_same_window() -> None:
    r = expect.distinct_window_sizes_at_least(facts(clean_run(sizes=(2,) * 6)), 2)
    assert not r["ok"] and r["value"] == 1 and "[2, 2, 2, 2, 2, 2]" in r["detail"], r


def test_max_recovery_s_fails_when_slow_or_never() -> None:
    records, t_kill = with_retry_of_hop_3(recover_after=8.0)
    r = expect.max_recovery_s(facts(records, faults=[kill(t_kill)]), 5)
    assert not r["ok"] and r["value"] > 5 and "after kill b" in r["detail"], r
    fast, t_fast = with_retry_of_hop_3(recover_after=1.5)
    assert expect.max_recovery_s(facts(fast, faults=[kill(t_fast)]), 5)["ok"]
    # A fault after the last receipt: the snake never moved again.
    r = expect.max_recovery_s(facts(clean_run(), faults=[kill(T0 + 25)]), 5)
    assert not r["ok"] and "no recovery after kill b" in r["detail"], r


def test_faults_injected_fails_when_a_scripted_fault_never_fired() -> None:
    never = analysis.FaultRecord(index=1, kind="stop", target="holder", hosts=[], trigger="on train_start hop 6")
    r = expect.faults_injected([kill(T0 + 3), never])
    assert not r["ok"] and "faults[1] stop holder" in r["detail"] and r["value"] == 1, r
    # The automatic inverse of a duration (not scripted) is not required to fire.
    inverse = analysis.FaultRecord(index=2, kind="continue", target="b", hosts=[], trigger="", scheduled=False)
    assert expect.faults_injected([kill(T0 + 3), inverse])["ok"]
