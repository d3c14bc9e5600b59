"""Next-hop scoring on hand-made profiles, and a whole job's laps driven by routing + state."""

from __future__ import annotations

import math
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from snakenode.identity import Identity
from snakenode.snake import job
from snakenode.snake.divergence import LN2, js_divergence
from snakenode.snake.routing import Candidate, rank
from snakenode.snake.state import JobState, after_hop, finish_hop, job_done, record_decline, start_job
from snakenode.train import data


def peer(i: int) -> str:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)).peer_id


A, B, C, D, E, F = sorted(peer(i) for i in range(1, 7))   # sorted: A < B < ... for tie-break checks
JOB = "00000000deadbeef"
SPEC = job.validate_spec({"model": "mlp", "dataset": "digits", "laps": 3})
W = SPEC["routing"]
UNIFORM = [10] * 10


def prof(pid: str, *, hist: list[int] | None = UNIFORM, sps: float = 100.0, mem: float = 4000.0,
         kind: str = "idle", jobs: tuple[str, ...] = (JOB,), fingerprint: str | None = None, tokens: int = 0,
         state_job: str | None = None, state_hop: int | None = None) -> dict:
    return {"peer_id": pid, "seq": 1, "addrs": [], "role": "node", "version": "0.1.0", "network": "t",
            "compute": {"samples_per_s": sps, "workload": "mlp-ref-v1"}, "memory_mb": mem,
            "data": {"dataset": "digits", "task": "classification", "samples": 100, "num_classes": 10,
                     "label_hist": list(hist) if hist is not None else [], "tokens": tokens,
                     "fingerprint": fingerprint or f"fp-{pid[-6:]}"},
            "state": {"kind": kind, "job": state_job, "hop": state_hop}, "jobs": list(jobs),
            "lap_port": None, "future_field": {"tolerated": True}}


def cand(pid: str, rtt: float | None = 5.0, alive: bool = True, seen: float = 1.0, **kw: object) -> Candidate:
    return Candidate(pid, prof(pid, **kw), alive, seen, rtt)  # type: ignore[arg-type]


def holding(holder: str, members: list[str]) -> JobState:
    """`holder` just finished hop 0 of a lap over `members`."""
    return finish_hop(start_job(JOB, members, holder, 1, 4), metric=None, members=members)


# ---------------------------------------------------------------------------------------------- divergence


def test_js_divergence_values() -> None:
    assert js_divergence([1, 2, 3], [2, 4, 6]) == 0.0
    assert js_divergence([5, 0], [0, 7]) == pytest.approx(LN2)
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(
        0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)))
    assert js_divergence([3, 1], [1, 3]) == js_divergence([1, 3], [3, 1])
    assert js_divergence([1, 1], [1, 1, 0, 0]) == 0.0          # padding
    assert js_divergence([], []) == 0.0 and js_divergence([0, 0], [1]) == pytest.approx(LN2)
    with pytest.raises(ValueError):
        js_divergence([1, -1], [1, 1])
    with pytest.raises(ValueError):
        js_divergence([1, float("nan")], [1, 1])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 1000), min_size=n, max_size=n),
                                                      st.lists(st.integers(0, 1000), min_size=n, max_size=n))))
def test_js_divergence_is_the_data_modules_definition(pq: tuple[list[int], list[int]]) -> None:
    """kd.mode = auto (train/data.py) and routing must agree on what "diverges" means."""
    p, q = pq
    if sum(p) == 0 or sum(q) == 0:
        return
    assert js_divergence(p, q) == pytest.approx(data.js_divergence(p, q), abs=1e-12)
    assert 0.0 <= js_divergence(p, q) <= LN2


# ---------------------------------------------------------------------------------------------- eligibility


def test_every_exclusion_reason() -> None:
    members = [A, B, C, D, E]
    s = holding(A, members)
    s = record_decline(s, E, spec={**SPEC, "lap": {**SPEC["lap"], "max_declines": 1}}, members=members)
    cands = [
        cand(A),                                        # self
        Candidate(B, {"peer_id": C}, True, 1.0, 5.0),   # profile claims another id
        cand(C, alive=False),
        cand(D, seen=99.0),
        cand(E),                                        # dropped after declining
        cand(F),                                        # joined mid-lap: next lap
    ]
    r = rank(W, s, A, cands, max_silence_s=30.0)
    assert r.choices == [] and r.lap == "current" and r.remaining == [B, C, D]
    assert dict(r.excluded) == {A: "self", B: "bad_profile", C: "down", D: "silent", E: "dropped",
                                F: "not_in_lap"}
    more = [cand(B, jobs=()), cand(C, kind="training"), cand(D, mem=10.0),
            cand(F, kind="reserved", state_job=JOB, state_hop=1)]
    r = rank(W, s, A, more, excluded={D: "timeout"}, min_memory_mb=50.0)
    assert dict(r.excluded) == {B: "not_joined", C: "busy", D: "timeout", F: "not_in_lap"}
    r = rank(W, s, A, [cand(D, mem=10.0)], min_memory_mb=50.0)
    assert dict(r.excluded) == {D: "no_memory"}
    r = rank(W, s, A, [cand(D)], excluded={D})
    assert dict(r.excluded) == {D: "declined"}


def test_reserved_for_this_jobs_next_hop_counts_as_available() -> None:
    s = holding(A, [A, B, C, D])
    r = rank(W, s, A, [cand(B, kind="reserved", state_job=JOB, state_hop=1),
                       cand(C, kind="reserved", state_job="ffffffffffffffff", state_hop=1),
                       cand(D, kind="reserved", state_job=JOB, state_hop=7)])
    assert [c.peer_id for c in r.choices] == [B]
    assert dict(r.excluded) == {C: "busy", D: "busy"}


def test_lap_rule_is_hard_the_snake_waits_for_an_unvisited_member() -> None:
    s = holding(A, [A, B, C])
    s = finish_hop(after_hop(s, B, 1, spec=SPEC), metric=None, members=[A, B, C])   # B holds; C remains
    r = rank(W, s, B, [cand(A, sps=1e6, rtt=0.1), cand(C, kind="training")])
    assert r.choices == [] and r.remaining == [C]                # A is idle and fast, but visited: wait
    assert dict(r.excluded) == {A: "visited", C: "busy"}
    r = rank(W, s, B, [cand(A), cand(C)])
    assert r.best == C and r.choices[0].reasons["lap"] == "current"


def test_complete_lap_opens_the_next_laps_members() -> None:
    s = holding(A, [A, B])
    s = finish_hop(after_hop(s, B, 1, spec=SPEC), metric=None, members=[A, B, C])   # lap 0 done, rolled
    assert s.lap == 1
    r = rank(W, s, B, [cand(A), cand(C)])
    assert {c.peer_id for c in r.choices} == {A, C} and r.lap == "current"
    # an unrolled state whose lap is complete: everyone eligible is a next-lap member
    unrolled = JobState.from_dict({**s.to_dict(), "visited": [A, B, C]})
    r = rank(W, unrolled, B, [cand(A), cand(C), cand(D)])
    assert r.lap == "next" and {c.peer_id for c in r.choices} == {A, C, D}


# ---------------------------------------------------------------------------------------------- scoring


def test_novel_data_beats_compute_and_link() -> None:
    skew = [90, 10, 0, 0, 0, 0, 0, 0, 0, 0]
    s = holding(A, [A, B, C, D])
    cands = [cand(A, hist=skew),                                             # the recent holder
             cand(B, hist=skew, sps=1000.0, rtt=1.0),                        # same data, fast, close
             cand(C, hist=[0, 0, 30, 30, 30, 0, 0, 0, 0, 0], sps=50.0, rtt=80.0),   # novel, slow, far
             cand(D, hist=[10, 0, 20, 20, 20, 20, 0, 0, 0, 0], sps=50.0, rtt=80.0)]   # mostly novel
    r = rank(W, s, A, cands)
    assert [c.peer_id for c in r.choices] == [C, D, B]
    assert 0.5 < r.choices[1].reasons["novelty"] < 1.0
    top = r.choices[0]
    assert top.reasons["novelty"] == pytest.approx(1.0) and top.reasons["js"] == pytest.approx(LN2, abs=1e-6)
    assert r.choices[-1].reasons["novelty"] == 0.0
    assert top.score == pytest.approx(W["novelty"] * 1.0 + W["compute"] * 0.05 + W["link"] * 2 / 81, abs=1e-6)


def test_reference_sums_the_last_recent_hops_holders() -> None:
    members = [A, B, C, D, E]
    s = holding(A, members)
    for h in (B, C):
        s = finish_hop(after_hop(s, h, 1, spec=SPEC), metric=None, members=members)
    assert s.recent == (A, B, C)
    hists = {A: [100, 0, 0], B: [0, 100, 0], C: [0, 100, 0], D: [0, 0, 100], E: [100, 0, 0]}
    cands = [cand(p, hist=h) for p, h in hists.items()]
    r = rank(W, s, C, cands)
    assert [c.peer_id for c in r.choices] == [D, E]     # class 2 never seen; class 0 seen once of three
    assert r.choices[0].reasons["js"] == pytest.approx(js_divergence([0, 0, 100], [100, 200, 0]))
    # with recent_hops = 1 only C's data counts: E's class 0 is as novel as D's class 2 -> peer id decides
    r1 = rank({**W, "recent_hops": 1}, s, C, cands)
    assert [c.peer_id for c in r1.choices] == [D, E] and r1.choices[0].score == r1.choices[1].score


def test_compute_then_link_then_peer_id() -> None:
    s = holding(A, [A, B, C, D, E])
    # equal data: compute (weight 0.3) and link (0.2) decide; equal everything: the lower peer id
    r = rank(W, s, A, [cand(B, sps=20, rtt=8.0), cand(C, sps=100, rtt=50.0), cand(D, sps=100, rtt=10.0),
                       cand(E, sps=100, rtt=10.0)])
    assert [c.peer_id for c in r.choices] == [D, E, C, B]
    assert r.choices[0].reasons["compute"] == 1.0 and r.choices[-1].reasons["compute"] == 0.2
    assert r.choices[0].reasons["link"] == pytest.approx(9 / 11, abs=1e-6)
    assert r.choices[0].score == r.choices[1].score
    unknown = rank(W, s, A, [cand(B, rtt=None), cand(C, rtt=400.0)])
    assert [c.peer_id for c in unknown.choices] == [C, B] and unknown.choices[1].reasons["link"] == 0.0


def test_missing_reference_makes_everyone_novel() -> None:
    s = holding(A, [A, B, C])
    r = rank(W, s, A, [cand(B, hist=[1, 0]), cand(C, hist=[0, 1])])      # A (self) not listed
    assert all(c.reasons["novelty"] == 1.0 and c.reasons["js"] is None for c in r.choices)


def test_lm_jobs_use_fingerprints_and_tokens() -> None:
    s = holding(A, [A, B, C, D])
    cands = [cand(A, hist=None, fingerprint="same", tokens=1000),
             cand(B, hist=None, fingerprint="same", tokens=9000),          # data the model just saw
             cand(C, hist=None, fingerprint="c", tokens=2000),
             cand(D, hist=None, fingerprint="d", tokens=4000)]
    r = rank(W, s, A, cands)
    assert [c.peer_id for c in r.choices] == [D, C, B]
    assert [c.reasons["novelty"] for c in r.choices] == [1.0, 0.75, 0.0]


def test_malformed_profiles_never_crash_ranking() -> None:
    s = holding(A, [A, B, C, D, E, F])
    weird = [Candidate(B, {"state": "idle", "jobs": JOB}, True, 1.0, 5.0),
             Candidate(C, {"state": {"kind": "idle"}, "jobs": [JOB], "memory_mb": "lots"}, True, 1.0, 5.0),
             Candidate(D, {**prof(D), "data": {"label_hist": [1, -5, "x"]}, "compute": []}, True, 1.0,
                       float("nan")),
             Candidate(E, ["not", "a", "map"], True, 1.0, 5.0),  # type: ignore[arg-type]
             Candidate(F, {**prof(F), "data": None}, True, float("inf"), -3.0)]
    r = rank(W, s, A, weird, max_silence_s=10)
    assert dict(r.excluded) == {B: "not_joined", C: "no_memory", E: "bad_profile", F: "silent"}
    assert [c.peer_id for c in r.choices] == [D] and r.choices[0].reasons["link"] == 0.0
    with pytest.raises(ValueError, match="once"):
        rank(W, s, A, [cand(B), cand(B)])


def test_ranking_is_deterministic_whatever_the_input_order() -> None:
    rnd = random.Random(7)
    s = holding(A, [A, B, C, D, E, F])
    cands = [cand(p, hist=[rnd.randint(0, 50) for _ in range(10)], sps=rnd.choice([10.0, 20.0]),
                  rtt=rnd.choice([None, 3.0, 9.0])) for p in (A, B, C, D, E, F)]
    first = rank(W, s, A, cands)
    for _ in range(5):
        rnd.shuffle(cands)
        assert rank(W, s, A, cands) == first


# ---------------------------------------------------------------------------------------------- a whole job


def test_three_laps_every_member_holds_the_snake_each_lap() -> None:
    """4 nodes with skewed data; a fifth joins during lap 0; one busy node; decisions by rank() only."""
    hists = {A: [50, 50, 0, 0], B: [0, 50, 50, 0], C: [0, 0, 50, 50], D: [50, 0, 0, 50], E: [25, 25, 25, 25]}
    joined = [A, B, C, D]
    s = start_job(JOB, joined, A, 1, 4)
    holders_per_lap: dict[int, list[str]] = {}
    holders_per_lap.setdefault(s.lap, []).append(s.holder)
    busy_once = {C}
    for _ in range(40):
        if s.hop == 2:
            joined = [A, B, C, D, E]                                          # E joins mid-lap 0
        s = finish_hop(s, metric=0.9, members=joined)
        if job_done(s, SPEC):
            break
        while True:
            cands = [cand(p, hist=hists[p], kind="training" if p in busy_once else "idle") for p in joined]
            r = rank(W, s, s.holder, cands)
            if r.choices:
                break
            assert r.remaining and set(r.remaining) <= busy_once               # waits for the busy member
            busy_once.clear()
        s = after_hop(s, r.best, 1, spec=SPEC)  # type: ignore[arg-type]
        holders_per_lap.setdefault(s.lap, []).append(s.holder)
    assert s.lap == 3 and job_done(s, SPEC)
    assert sorted(holders_per_lap[0]) == sorted([A, B, C, D])                 # E not visited in lap 0
    assert sorted(holders_per_lap[1]) == sorted([A, B, C, D, E])
    assert sorted(holders_per_lap[2]) == sorted([A, B, C, D, E])
    assert all(a != b for a, b in zip(holders_per_lap[1], holders_per_lap[1][1:], strict=False))
