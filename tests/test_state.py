"""job_state: lineage, fencing, strict decoding and the lap rules as pure transitions."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from snakenode.identity import Identity
from snakenode.snake import job, state
from snakenode.snake.state import (
    Claim,
    JobState,
    StateError,
    after_hop,
    compare_claims,
    drop_down,
    drop_member,
    finish_hop,
    genesis_lineage,
    in_lineage,
    is_stale,
    job_done,
    lap_complete,
    lap_remaining,
    lineage_next,
    record_decline,
    resize,
    retry,
    roll_lap,
    start_job,
)
from snakenode.snake.window import Window, first_window, next_window


def peer(i: int) -> str:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)).peer_id


A, B, C, D, E = (peer(i) for i in range(1, 6))
JOB = "0123456789abcdef"
SPEC = job.validate_spec({"model": "mlp", "dataset": "digits", "laps": 2})
BLOCKS = 8
ARCH_KEYS = {"hop", "attempt", "lineage", "lap", "lap_members", "visited", "window", "declines", "dropped",
             "recent", "holder", "lap_metrics"}


def hop_to(s: JobState, holder: str, size: int = 2, *, metric: float | None = 0.5,
           members: list[str] | None = None) -> JobState:
    """Finish the current hop and hand the snake to `holder`."""
    s = finish_hop(s, metric=metric, members=members or [A, B, C])
    return after_hop(s, holder, size, spec=SPEC)


# ---------------------------------------------------------------------------------------------- lineage


def test_lineage_is_sha256_of_the_documented_encoding() -> None:
    parent = genesis_lineage(JOB)
    assert parent == hashlib.sha256(b"snakenode/lineage/genesis\0" + JOB.encode()).hexdigest()
    raw = bytes.fromhex(parent) + (5).to_bytes(8, "big") + (2).to_bytes(4, "big") + A.encode()
    assert lineage_next(parent, 5, 2, A) == hashlib.sha256(raw).hexdigest()
    # every input matters
    others = {lineage_next(parent, 6, 2, A), lineage_next(parent, 5, 3, A), lineage_next(parent, 5, 2, B),
              lineage_next(lineage_next(parent, 0, 0, A), 5, 2, A)}
    assert len(others | {lineage_next(parent, 5, 2, A)}) == 5


@pytest.mark.parametrize("args", [("xyz", 0, 0, "p"), ("0" * 64, -1, 0, "p"), ("0" * 64, 0, 2**32, "p"),
                                  ("0" * 64, 0, 0, ""), ("0" * 64, True, 0, "p"), ("A" * 64, 0, 0, "p")])
def test_lineage_inputs_are_checked(args: tuple) -> None:
    with pytest.raises(StateError):
        lineage_next(*args)


# ---------------------------------------------------------------------------------------------- fencing


def test_compare_claims_follows_design_rule() -> None:
    lo, hi = "1" * 64, "f" * 64
    assert compare_claims(Claim(2, 10, 0, hi), Claim(1, 30, 5, lo)) == 1      # higher lap first
    assert compare_claims(Claim(1, 11, 0, hi), Claim(1, 10, 9, lo)) == 1      # then higher hop
    assert compare_claims(Claim(1, 10, 2, hi), Claim(1, 10, 1, lo)) == 1      # then higher attempt
    assert compare_claims(Claim(1, 10, 1, lo), Claim(1, 10, 1, hi)) == 1      # then the lower lineage
    assert compare_claims(Claim(1, 10, 1, hi), Claim(1, 10, 1, lo)) == -1
    assert compare_claims(Claim(1, 10, 1, lo), Claim(1, 10, 1, lo)) == 0


def test_is_stale() -> None:
    s0 = start_job(JOB, [A, B], A, 2, BLOCKS)
    s1 = hop_to(s0, B)
    assert not is_stale(s1.claim, None)
    assert not is_stale(s1.claim, s0.claim)           # the next hop is news
    assert not is_stale(s1.claim, s1.claim)           # a retransmission is not stale
    assert is_stale(s0.claim, s1.claim)               # an old hop is
    base = finish_hop(s0, metric=None, members=[A, B, C])
    s1b = retry(base, s1, C, 2, spec=SPEC)
    assert (s1b.hop, s1b.attempt) == (1, 1)
    assert is_stale(s1.claim, s1b.claim)              # the attempt the retry replaced
    assert not is_stale(s1b.claim, s1.claim)


def test_ancestry_tells_descendants_from_rivals() -> None:
    s = start_job(JOB, [A, B, C], A, 1, BLOCKS)
    chain = [s]
    for h in [B, C, A, B, C] * 4:
        chain.append(hop_to(chain[-1], h, 1))
    last = chain[-1]
    assert in_lineage(last, chain[-2].lineage) and in_lineage(last, last.lineage)
    assert len(last.ancestry) == state.ANCESTRY_KEEP and last.ancestry[-1] == last.parent_lineage
    rival = retry(finish_hop(chain[-2], metric=None, members=[A, B, C]), last, A, 1, spec=SPEC)
    assert not in_lineage(last, rival.lineage)


# ---------------------------------------------------------------------------------------------- codec


def test_to_dict_has_the_architecture_keys_and_round_trips() -> None:
    s = hop_to(start_job(JOB, [A, B, C], A, 2, BLOCKS), B, 3)
    s = record_decline(finish_hop(s, metric=0.7, members=[A, B, C]), C, spec=SPEC, members=[A, B, C])
    d = s.to_dict()
    assert ARCH_KEYS <= set(d)
    assert d["window"] == {"start": 2, "size": 3, "dir": 1}
    assert JobState.from_dict(d) == s
    import msgpack

    assert JobState.from_dict(msgpack.unpackb(msgpack.packb(d))) == s


def _mutations(d: dict) -> list[tuple[str, dict]]:
    def m(**kw: object) -> dict:
        return {**d, **kw}

    extra = dict(d)
    extra["surprise"] = 1
    missing = dict(d)
    del missing["visited"]
    return [
        ("unknown keys", extra), ("missing keys", missing),
        ("hop", m(hop=True)), ("hop", m(hop=-1)), ("attempt", m(attempt=1.0)),
        ("lineage does not match", m(attempt=d["attempt"] + 1)),
        ("lineage", m(lineage="zz")), ("holder", m(holder="not-a-peer")),
        ("lap_members lists a peer twice", m(lap_members=[A, A])),
        ("visited", m(visited="abc")), ("declines", m(declines={B: 0})),
        ("drop_reasons", m(drop_reasons={B: "bored"})), ("lap_metrics", m(lap_metrics=[float("nan")])),
        ("window", m(window={"start": 7, "size": 3, "dir": 1})),
        ("does not follow", m(window={"start": 4, "size": 2, "dir": 1})),
        ("job_id", m(job_id="XYZ")), ("blocks", m(blocks=0)), ("finished", m(finished=1)),
        ("ancestry must end", m(ancestry=["0" * 64])),
        ("job_state must be a map", [1, 2]),  # type: ignore[list-item]
    ]


def test_from_dict_is_strict() -> None:
    d = hop_to(start_job(JOB, [A, B, C], A, 2, BLOCKS), B, 2).to_dict()
    for needle, bad in _mutations(d):
        with pytest.raises(StateError, match=needle):
            JobState.from_dict(bad)
    genesis = start_job(JOB, [A, B], A, 2, BLOCKS).to_dict()
    fake_parent = "0" * 64
    genesis.update(parent_lineage=fake_parent, lineage=lineage_next(fake_parent, 0, 0, A))
    with pytest.raises(StateError, match="genesis"):
        JobState.from_dict(genesis)


# ---------------------------------------------------------------------------------------------- laps


def test_a_lap_visits_every_member_once_then_rolls() -> None:
    s = start_job(JOB, [C, A, B], A, 2, BLOCKS)
    assert (s.hop, s.attempt, s.lap, s.lap_members, s.visited) == (0, 0, 0, tuple(sorted([A, B, C])), (A,))
    assert s.window == first_window(2, BLOCKS) and s.recent == (A,)
    assert lap_remaining(s) == sorted([B, C])
    s = hop_to(s, B, 3, metric=0.5)
    assert s.window == Window(2, 3) and s.prev_window == Window(0, 2) and s.prev_holder == A
    s = hop_to(s, C, 2, metric=0.6)
    assert lap_complete(s) and s.lap == 0       # C holds the last hop of lap 0; it has not trained yet
    # D joined mid-lap: it becomes a member only when the next lap starts
    s = finish_hop(s, metric=0.7, members=[A, B, C, D])
    assert s.lap == 1 and s.lap_members == tuple(sorted([A, B, C, D])) and s.visited == ()
    assert s.lap_metrics == (pytest.approx(0.6),) and s.hop_metrics == ()
    assert lap_remaining(s) == sorted([A, B, C, D])
    s = after_hop(s, D, 1, spec=SPEC)
    assert s.lap == 1 and s.visited == (D,) and s.recent == (A, B, C, D)[-3:]


def test_after_hop_refuses_protocol_mistakes() -> None:
    s = start_job(JOB, [A, B], A, 2, BLOCKS)
    with pytest.raises(StateError, match="finish_hop"):
        after_hop(s, B, 2, spec=SPEC)
    done = finish_hop(s, metric=None, members=[A, B])
    with pytest.raises(StateError, match="already finished"):
        finish_hop(done, metric=None, members=[A, B])
    with pytest.raises(StateError, match="serpentine"):
        after_hop(done, B, Window(3, 2), spec=SPEC)
    assert after_hop(done, B, Window(2, 2), spec=SPEC).window == Window(2, 2)
    # lap complete but not rolled (a drop made by hand without members)
    unrolled = replace(done, dropped=(B,))
    with pytest.raises(StateError, match="roll_lap"):
        after_hop(unrolled, B, 2, spec=SPEC)
    with pytest.raises(StateError, match="at least one member"):
        roll_lap(unrolled, [])
    with pytest.raises(StateError):
        after_hop(done, "nobody", 2, spec=SPEC)


def test_retry_keeps_the_hop_and_bumps_the_attempt() -> None:
    s0 = start_job(JOB, [A, B, C], A, 2, BLOCKS)
    base = finish_hop(s0, metric=0.4, members=[A, B, C])
    failed = after_hop(base, B, 3, spec=SPEC)
    again = retry(base, failed, C, 2, spec=SPEC)
    assert (again.hop, again.attempt, again.holder) == (1, 1, C)
    assert again.parent_lineage == failed.parent_lineage == base.lineage and again.lineage != failed.lineage
    assert again.visited == (A, C) and again.window == Window(2, 2)
    third = retry(base, again, B, 1, spec=SPEC)
    assert third.attempt == 2
    # a state that does not follow this node's hop cannot be retried from it
    with pytest.raises(StateError, match="cannot retry"):
        retry(finish_hop(failed, metric=None, members=[A, B, C]), failed, C, 1, spec=SPEC)
    # hop 0 is retried without a predecessor state
    first_again = retry(None, s0, B, 2, spec=SPEC)
    assert (first_again.hop, first_again.attempt, first_again.holder) == (0, 1, B)
    assert first_again.parent_lineage == genesis_lineage(JOB)


def test_retry_after_the_failed_member_was_dropped_starts_the_next_lap() -> None:
    s = hop_to(start_job(JOB, [A, B, C], A, 1, BLOCKS), B, 1)
    base = finish_hop(s, metric=None, members=[A, B, C])          # B holds; only C remains
    failed = after_hop(base, C, 1, spec=SPEC)                     # C accepted, then died
    base = drop_down(base, {C: 31.0}, spec=SPEC, members=[A, B])  # down longer than lap.drop_after_s
    assert base.lap == 1 and base.lap_members == tuple(sorted([A, B]))
    again = retry(base, failed, A, 1, spec=SPEC)
    assert (again.hop, again.attempt, again.lap, again.visited) == (2, 1, 1, (A,))


def test_declines_in_a_row_drop_a_member_and_the_lap_still_ends() -> None:
    members = [A, B, C]
    s = finish_hop(hop_to(start_job(JOB, members, A, 1, BLOCKS), B, 1), metric=0.5, members=members)
    for n in (1, 2):
        s = record_decline(s, C, spec=SPEC, members=members)
        assert s.declines[C] == n and C not in s.dropped and s.lap == 0
    s = record_decline(s, C, spec=SPEC, members=members)          # lap.max_declines = 3
    assert s.lap == 1 and s.lap_metrics == (0.5,)                 # C dropped -> lap 0 complete, rolled
    assert s.lap_members == tuple(sorted(members)) and s.dropped == ()
    assert s.declines[C] == 3                                     # "in a row" survives the lap
    s = record_decline(s, C, spec=SPEC, members=members)
    assert C in s.dropped and s.drop_reasons == {C: "declines"}  # next lap: dropped at the first decline
    s = after_hop(s, A, 1, spec=SPEC)
    s = finish_hop(s, metric=0.6, members=members)
    s = record_decline(s, B, spec=SPEC, members=members)
    assert s.declines[B] == 1
    s = after_hop(s, B, 1, spec=SPEC)                             # accepting resets the count
    assert B not in s.declines


def test_drop_member_is_idempotent_and_only_for_unsettled_members() -> None:
    s = finish_hop(start_job(JOB, [A, B, C], A, 1, BLOCKS), metric=None, members=[A, B, C])
    assert drop_member(s, A, "down", members=[A, B, C]) == s      # visited
    assert drop_member(s, D, "down", members=[A, B, C]) == s      # not a member
    once = drop_member(s, B, "down", members=[A, B, C])
    assert drop_member(once, B, "down", members=[A, B, C]) == once
    with pytest.raises(StateError, match="reason"):
        drop_member(s, B, "grumpy", members=[A, B, C])
    assert drop_down(s, {B: 29.9, C: 5.0}, spec=SPEC, members=[A, B, C]) == s


def test_job_done_by_laps_or_target() -> None:
    members = [A, B]
    s = start_job(JOB, members, A, 1, BLOCKS)
    metrics = iter([0.5, 0.7, 0.8, 0.95])
    s = finish_hop(s, metric=next(metrics), members=members)
    assert not job_done(s, SPEC)
    s = finish_hop(after_hop(s, B, 1, spec=SPEC), metric=next(metrics), members=members)
    assert s.lap == 1 and not job_done(s, SPEC)                   # 1 of 2 laps
    s = finish_hop(after_hop(s, A, 1, spec=SPEC), metric=next(metrics), members=members)
    s = finish_hop(after_hop(s, B, 1, spec=SPEC), metric=next(metrics), members=members)
    assert s.lap == 2 and job_done(s, SPEC)
    assert s.lap_metrics == (pytest.approx(0.6), pytest.approx(0.875))
    # target: mean post-hop metric over the last full lap
    target = {**SPEC, "laps": 10, "target_metric": 0.8}
    assert job_done(s, target) and not job_done(s, target, lap_metrics=[0.6])
    assert not job_done(s, {**SPEC, "laps": 10})                  # no target: laps only
    lm = job.validate_spec({"model": "llama-tiny", "dataset": "text:pydoc", "laps": 10,
                            "target_metric": 20.0})
    assert job_done(s, lm, lap_metrics=[25.0, 19.5]) and not job_done(s, lm, lap_metrics=[19.0, 25.0])
    assert not job_done(s, lm, lap_metrics=[None])


def test_resize_keeps_the_policy() -> None:
    s = hop_to(start_job(JOB, [A, B], A, 2, BLOCKS), B, 3)
    smaller = resize(s, 1)
    assert smaller.window == next_window(Window(0, 2), 1, BLOCKS) and smaller.lineage == s.lineage
    assert JobState.from_dict(smaller.to_dict()) == smaller


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["accept", "decline", "down"]), st.integers(0, 4),
                          st.integers(1, 4)), max_size=40))
def test_random_runs_keep_the_invariants(steps: list[tuple[str, int, int]]) -> None:
    """Whatever happens, laps only close when every member is settled, the state always round-trips
    through its strict codec, and hops/lineages chain."""
    peers = [A, B, C, D, E]
    members = peers[:4]
    s = finish_hop(start_job(JOB, members, A, 1, BLOCKS), metric=0.5, members=members)
    for action, who, size in steps:
        target = peers[who]
        if action == "decline":
            s = record_decline(s, target, spec=SPEC, members=members)
        elif action == "down":
            s = drop_down(s, {target: 100.0}, spec=SPEC, members=members)
        else:
            remaining = lap_remaining(s)
            if not remaining:
                continue
            holder = remaining[who % len(remaining)]
            nxt = after_hop(s, holder, size, spec=SPEC)
            assert nxt.hop == s.hop + 1 and nxt.parent_lineage == s.lineage
            assert nxt.window == next_window(s.window, size, BLOCKS)
            s = finish_hop(nxt, metric=0.5, members=members)
        assert JobState.from_dict(s.to_dict()) == s
        assert set(s.visited) | set(s.dropped) <= set(s.lap_members) | {s.holder}
        assert not lap_complete(s) or not s.finished or s.lap_members == ()
