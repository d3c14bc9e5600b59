"""Expectations: each one a pure check over what a run produced. Canonical names (issue 6):
job_completes, accuracy_at_least, max_hops_redone, no_bundle_lost, every_member_visited_each_lap,
one_lineage; added here: distinct_window_sizes_at_least, max_recovery_s, and the automatic faults_injected
(a scenario whose faults never fired did not test what it claims).

Each check returns {name, ok, detail, value, limit}; `detail` is one sentence a reader can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scenarios import analysis
from snakenode.snake import hoplog


@dataclass
class Facts:
    """Everything the checks may look at, gathered by the runner for one job."""

    job: str
    records: list[dict[str, Any]]
    submitted_at: float
    ended_at: float
    blocks: int
    faults: list[analysis.FaultRecord]
    ready_times: dict[str, list[float]]  # host name -> times it was seen ready for this job
    members: list[str]  # hosts that join this job (role node, matching data)
    name_of: dict[str, str]  # peer id -> host name
    fetch: dict[str, Any] | None = None  # the `fetch` reply for the final model, or {"error": ...}
    summary_test: dict[str, Any] | None = None  # `jobs --json` summary.completed.test, as a cross-check
    claims: list[analysis.Claim] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.claims:
            self.claims = analysis.claims(self.records)

    def host(self, peer: str | None) -> str:
        return "-" if peer is None else self.name_of.get(peer, peer[-8:])


def _result(name: str, ok: bool, detail: str, value: Any = None, limit: Any = None) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail, "value": value, "limit": limit}


def job_completes(f: Facts, limit: float) -> dict[str, Any]:
    final = analysis.completion(f.records)
    if final is None:
        return _result("job_completes", False, f"job {f.job} did not complete within the run "
                       f"({f.ended_at - f.submitted_at:.1f} s after submission)", None, limit)
    took = round(float(final["t"]) - f.submitted_at, 2)
    return _result("job_completes", took <= limit,
                   f"completed in {took:.1f} s (limit {limit:g} s): {final['hop'] + 1} hops, {final['lap']} laps, "
                   f"final holder {f.host(final['holder'])}", took, limit)


def accuracy_at_least(f: Facts, limit: float) -> dict[str, Any]:
    acc = analysis.test_accuracy(analysis.completion(f.records))
    source = "the final holder's job_complete record"
    if acc is None and f.summary_test and isinstance(f.summary_test.get("accuracy"), int | float):
        acc, source = float(f.summary_test["accuracy"]), "jobs --json summary.completed.test"
    if acc is None:
        return _result("accuracy_at_least", False, "no test accuracy: the job did not complete (or its final "
                       "evaluation failed)", None, limit)
    return _result("accuracy_at_least", acc >= limit, f"test accuracy {acc:.4f} (from {source}) vs "
                   f"required {limit:g}", round(acc, 4), limit)


def max_hops_redone(f: Facts, limit: int) -> dict[str, Any]:
    n, which = analysis.hops_redone(f.claims)
    retries = sum(1 for r in f.records if r["event"] == "retry")
    detail = f"{n} hop(s) trained again ({'; '.join(which) or 'none'}); {retries} retry record(s)"
    return _result("max_hops_redone", n <= limit, detail, n, limit)


def no_bundle_lost(f: Facts) -> dict[str, Any]:
    problems = []
    final = analysis.completion(f.records)
    if final is None:
        problems.append("the job did not complete")
    problems += hoplog.validate_log(f.records, f.blocks)[:5] if f.blocks else []
    ch = analysis.chain(f.claims)
    missing = [c.hop for c in ch if c.first("received") is None and c.first("resumed") is None]
    if missing:
        problems.append(f"hops {missing} of the surviving lineage have no received record")
    if ch and [c.hop for c in ch] != list(range(ch[0].hop, ch[0].hop + len(ch))):
        problems.append("the surviving lineage has gaps")
    if final is not None:
        if f.fetch is None or "error" in f.fetch:
            problems.append(f"the final model could not be fetched: {(f.fetch or {}).get('error', 'not tried')}")
        elif f.fetch.get("bytes", 0) <= 0:
            problems.append("the fetched final model is empty")
    if problems:
        return _result("no_bundle_lost", False, "; ".join(str(p) for p in problems)[:600])
    return _result("no_bundle_lost", True, f"every one of {len(ch)} hops on the surviving lineage received its "
                   f"bundle, the log validates, and the final model was fetched ({f.fetch['bytes']} bytes, "
                   f"{len(f.fetch.get('layers', {}))} layers)")


def every_member_visited_each_lap(f: Facts) -> dict[str, Any]:
    laps = [lap for lap in analysis.laps(f.claims) if lap.end is not None]
    if not laps:
        return _result("every_member_visited_each_lap", False, "no lap completed")
    bad, parts = [], []
    for lap in laps:
        assert lap.end is not None
        required = [h for h in f.members if analysis.available(h, f.ready_times.get(h, []), f.faults, lap.start,
                                                                lap.end)]
        visited = {f.host(p) for p in lap.holders}
        dropped = {f.host(p) for p in lap.dropped}
        missing = sorted(set(required) - visited - dropped)
        if missing:
            bad.append(f"lap {lap.index}: {', '.join(missing)} never held the snake")
        extra = f", dropped {', '.join(sorted(dropped))}" if dropped else ""
        parts.append(f"lap {lap.index}: {len(visited)} visited of {len(required)} required{extra}")
    return _result("every_member_visited_each_lap", not bad, "; ".join(bad or parts))


def one_lineage(f: Facts, limit: float) -> dict[str, Any]:
    heals = [x.t for x in f.faults if x.kind == "heal" and x.t is not None]
    others = [x.t for x in f.faults if x.t is not None]
    ref = max(heals) if heals else (max(others) if others else f.submitted_at)
    what = "the last heal" if heals else ("the last fault" if others else "submission")
    finals = sorted({r["lineage"] for r in f.records if r["event"] == "job_complete"})
    forks = [c for c in f.claims if not c.surviving and c.count("trained")]
    late = [(t, c) for t, c in analysis.rival_activity_after(f.claims, ref + limit)]
    converged = analysis.rival_activity_after(f.claims, ref)
    took = round(max(0.0, converged[0][0] - ref), 2) if converged else 0.0
    if len(finals) > 1:
        return _result("one_lineage", False, f"{len(finals)} lineages reached job_complete", took, limit)
    if not analysis.chain(f.claims):
        return _result("one_lineage", False, "no lineage made progress", None, limit)
    if late:
        t, c = late[0]
        return _result("one_lineage", False, f"rival lineage {c.lineage[:12]} (hop {c.hop} on {f.host(c.holder)}) "
                       f"still worked {t - ref:.1f} s after {what} (limit {limit:g} s)", took, limit)
    superseded = sum(1 for r in f.records if r["event"] == "superseded")
    return _result("one_lineage", True, f"one lineage {took:.1f} s after {what}; {len(forks)} hop(s) were trained "
                   f"off the surviving lineage, {superseded} superseded record(s)", took, limit)


def distinct_window_sizes_at_least(f: Facts, limit: int) -> dict[str, Any]:
    sizes = analysis.window_sizes(analysis.chain(f.claims))
    distinct = sorted(set(sizes))
    return _result("distinct_window_sizes_at_least", len(distinct) >= limit,
                   f"window sizes on the surviving lineage: {sizes} (distinct {distinct})", len(distinct), limit)


def hosts_held_the_snake(f: Facts, names: Sequence[str]) -> dict[str, Any]:
    """Named hosts trained the snake at least once: proof that a host which started late (or while the
    bootstrap peer was down) joined the job, which every_member_visited_each_lap cannot give, as it only
    asks for hosts that were ready."""
    held = {f.host(c.holder) for c in f.claims if c.count("trained")}
    missing = sorted(set(names) - held)
    detail = (f"never trained the snake: {', '.join(missing)}" if missing
              else f"{', '.join(sorted(names))} trained the snake")
    return _result("hosts_held_the_snake", not missing, detail, len(names) - len(missing), len(names))


def max_recovery_s(f: Facts, limit: float) -> dict[str, Any]:
    worst: tuple[float, str] | None = None
    unrecovered = []
    for x in f.faults:
        if x.t is None or x.kind in ("continue", "start", "link_up"):
            continue
        r = analysis.recovery(x, f.claims)
        if r is None:
            unrecovered.append(f"{x.kind} {x.target}")
        elif worst is None or r > worst[0]:
            worst = (r, f"{x.kind} {x.target}")
    if unrecovered:
        return _result("max_recovery_s", False, f"no recovery after {', '.join(unrecovered)}", None, limit)
    if worst is None:
        return _result("max_recovery_s", True, "no fault fired", 0.0, limit)
    return _result("max_recovery_s", worst[0] <= limit, f"slowest recovery {worst[0]:.1f} s after {worst[1]}",
                   worst[0], limit)


def faults_injected(faults: Sequence[analysis.FaultRecord]) -> dict[str, Any]:
    missed = [f"faults[{x.index}] {x.kind} {x.target} ({x.trigger})" for x in faults if x.scheduled and not x.fired]
    n = sum(1 for x in faults if x.scheduled)
    if missed:
        return _result("faults_injected", False, f"never fired: {'; '.join(missed)}", n - len(missed), n)
    return _result("faults_injected", True, f"all {n} scripted fault(s) fired", n, n)


def evaluate(expect: Mapping[str, Any], facts: Facts) -> list[dict[str, Any]]:
    """Run every expectation of a scenario over one job's facts, in the order they are written."""
    out = []
    for name, limit in expect.items():
        if name == "job_completes":
            out.append(job_completes(facts, float(limit)))
        elif name == "accuracy_at_least":
            out.append(accuracy_at_least(facts, float(limit)))
        elif name == "max_hops_redone":
            out.append(max_hops_redone(facts, int(limit)))
        elif name == "no_bundle_lost":
            out.append(no_bundle_lost(facts))
        elif name == "every_member_visited_each_lap":
            out.append(every_member_visited_each_lap(facts))
        elif name == "one_lineage":
            out.append(one_lineage(facts, float(limit)))
        elif name == "distinct_window_sizes_at_least":
            out.append(distinct_window_sizes_at_least(facts, int(limit)))
        elif name == "max_recovery_s":
            out.append(max_recovery_s(facts, float(limit)))
        elif name == "hosts_held_the_snake":
            out.append(hosts_held_the_snake(facts, list(limit)))
        else:  # spec.py refuses unknown names; this guards a forgotten branch
            out.append(_result(name, False, "unknown expectation"))
    return out
