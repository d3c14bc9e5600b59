"""The run's report: report.json (every hop, every fault with the target's state and the recovery time,
every expectation with its verdict), PNG plots, and the rich summary table printed at the end.

report.json keys: scenario, file, backend, ok, error, started_at, duration_s, hosts, jobs (each with its
`retries`: t, hop, attempt, by, failed_holder, why), hops, faults
[{t, kind, target, target_state, ...}], expectations [{name, ok, detail, ...}], plots, notes. Times named `t*`
are seconds since the first job's submission; `at` fields are unix seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from scenarios import analysis, expect
from scenarios.spec import Scenario
from snakenode import metric


class RunView(Protocol):
    """What a report reads of a finished run. scenarios.runner.Runner provides it; the report names this
    protocol instead of the runner, which imports the report (no import circle)."""

    sc: Scenario
    backend_name: str
    dir: Path
    faults: list[analysis.FaultRecord]
    job_ids: dict[str, str]
    submitted_at: float
    fetched: dict[str, dict[str, Any]]
    peer: dict[str, str]
    error: str
    notes: list[str]

    def facts(self, jname: str, records: list[dict[str, Any]], ended: float) -> expect.Facts: ...


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None or not t0 else round(t - t0, 3)


def hop_rows(facts: expect.Facts, t0: float) -> list[dict[str, Any]]:
    out_bytes: dict[str, int] = {}
    for r in facts.records:
        if r["event"] == "handoff" and r["parent_lineage"]:
            out_bytes[r["parent_lineage"]] = out_bytes.get(r["parent_lineage"], 0) + int(r["bytes"]["bundle_out"])
    rows = []
    for c in facts.claims:
        recv = c.first("received")
        trained = c.first("trained")
        start = c.first("train_start")
        w = (trained or start or recv or c.records[0]).get("window")
        if c.surviving:
            outcome = "ok"
        elif c.count("superseded"):
            outcome = "superseded"
        elif trained is not None:
            outcome = "forked"
        else:
            outcome = "lost"
        t_start = None if trained is None else trained["t_train_start"]
        t_end = None if trained is None else trained["t_train_end"]
        rows.append({
            "job": facts.job, "hop": c.hop, "attempt": c.attempt, "lineage": c.lineage[:16], "lap": c.lap,
            "holder": facts.host(c.holder), "prev_holder": facts.host(c.prev_holder) if c.prev_holder else None,
            "surviving": c.surviving, "outcome": outcome,
            "window": None if not w else [w["start"], w["end"]], "size": None if not w else w["end"] - w["start"],
            "t_recv": _rel(recv["t"] if recv else None, t0),
            "t_train_start": _rel(t_start if t_start is not None else (start["t"] if start else None), t0),
            "t_train_end": _rel(t_end, t0),
            "train_s": None if t_start is None or t_end is None else round(t_end - t_start, 3),
            "bytes_in": int(recv["bytes"]["bundle_in"]) if recv else 0,
            "bytes_out": out_bytes.get(c.lineage, 0),
            "metrics_before": None if trained is None else trained["metrics_before"],
            "metrics_after": None if trained is None else trained["metrics_after"],
            "kd": None if trained is None else ((trained.get("detail") or {}).get("kd") or {}).get("on"),
            "redone": c.count("train_start") > 1,
        })
    return rows


def retry_rows(facts: expect.Facts, t0: float) -> list[dict[str, Any]]:
    """Every `retry` record, with the reason the predecessor gave (`why`: disconnect, lease or transfer):
    a recovery time alone cannot tell the fast disconnect path from the lease lapse."""
    rows = []
    for r in facts.records:
        if r["event"] != "retry":
            continue
        d = r.get("detail") or {}
        rows.append({"t": _rel(r["t"], t0), "hop": r["hop"], "attempt": r["attempt"], "by": facts.host(r["node"]),
                     "failed_holder": facts.host(d.get("failed_holder")), "why": d.get("why")})
    return sorted(rows, key=lambda x: (x["t"] is None, x["t"] or 0.0))


def fault_rows(run: RunView, claims: list[analysis.Claim], t0: float) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(run.faults, key=lambda x: (x.t is None, x.t or 0.0)):
        rows.append({
            "t": _rel(f.t, t0), "at": f.t, "kind": f.kind, "target": f.target, "target_state": f.target_state,
            "trigger": f.trigger, "fired": f.fired, "scheduled": f.scheduled, "index": f.index,
            "ended_t": _rel(f.ends, t0), "recovery_s": analysis.recovery(f, claims) if claims else None,
            "detail": f.detail,
        })
    return rows


def build(run: RunView, records: dict[str, list[dict[str, Any]]], started: float) -> dict[str, Any]:
    """Judge the expectations, write report.json and the plots; returns the report."""
    ended = time.time()
    t0 = run.submitted_at
    expectations: list[dict[str, Any]] = []
    hops: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    first_claims: list[analysis.Claim] = []
    facts_by_job = {}
    for j in run.sc.jobs:
        if j.name not in run.job_ids:
            for name in run.sc.expect:
                expectations.append({"name": name, "ok": False, "job": j.name, "value": None, "limit": None,
                                     "detail": "the run stopped before this job was submitted"})
            continue
        facts = run.facts(j.name, records.get(j.name, []), ended)
        facts_by_job[j.name] = facts
        if not first_claims:
            first_claims = facts.claims
        for e in expect.evaluate(run.sc.expect, facts):
            expectations.append({**e, "job": j.name})
        hops += hop_rows(facts, t0)
        final = analysis.completion(facts.records)
        ch = analysis.chain(facts.claims)
        jobs.append({
            "name": j.name, "job_id": run.job_ids[j.name], "file": str(j.file), "overrides": j.overrides,
            "submit_from": j.submit_from, "model": j.spec["model"], "dataset": j.spec["dataset"],
            "laps": j.spec["laps"], "completed": final is not None,
            "completed_t": _rel(final["t"], t0) if final else None,
            "hops": len(ch), "final_holder": facts.host(final["holder"]) if final else None,
            "test": ((final or {}).get("detail") or {}).get("test"),
            "bytes_bundles": sum(h["bytes_in"] for h in hops if h["job"] == j.name),
            "fetch": run.fetched.get(j.name), "records": len(facts.records),
            "ready_t": {h: [_rel(t, t0) for t in ts] for h, ts in facts.ready_times.items()},
            "retries": retry_rows(facts, t0),
            "laps_seen": [{"lap": lap.index, "start_t": _rel(lap.start, t0), "end_t": _rel(lap.end, t0),
                           "holders": [facts.host(p) for p in lap.holders]} for lap in analysis.laps(facts.claims)],
        })
    if run.sc.faults:
        expectations.append({**expect.faults_injected(run.faults), "job": None})
    faults = fault_rows(run, first_claims, t0)
    ok = bool(expectations) and all(e["ok"] for e in expectations) and not run.error
    hosts = [{"name": h.name, "peer_id": run.peer.get(h.name), "role": h.role, "data": h.data,
              "partition": h.partition, "shard": h.shard, "memory_mb": h.memory_mb,
              "compute_slowdown": h.compute_slowdown, "bandwidth": h.bandwidth or None,
              "start_delay_s": h.start_delay_s, "hooks": list(h.hooks),
              "link_bytes": getattr(run, "link_counters", {}).get(h.name)} for h in run.sc.hosts]
    report: dict[str, Any] = {
        "scenario": run.sc.name, "description": run.sc.description,
        "file": str(run.sc.path) if run.sc.path else None, "backend": run.backend_name, "ok": ok,
        "error": run.error or None, "started_at": started, "submitted_at": t0 or None,
        "duration_s": round(ended - started, 2), "hosts": hosts, "jobs": jobs, "hops": hops, "faults": faults,
        "expectations": expectations, "plots": [], "notes": run.notes,
        "latency": "not emulated: this kernel has no netem qdisc (bandwidth only)",
    }
    run.dir.mkdir(parents=True, exist_ok=True)
    try:
        from scenarios import plots

        report["plots"] = plots.draw(report, facts_by_job, run.dir)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not hide the verdict
        report["notes"].append(f"plots failed: {type(exc).__name__}: {exc}")
    (run.dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return report


def table(report: dict[str, Any]) -> Any:
    """A rich renderable: verdict per expectation, then the faults with state and recovery, then totals."""
    from rich.console import Group
    from rich.table import Table

    verdict = "[bold green]PASS[/]" if report["ok"] else "[bold red]FAIL[/]"
    exp = Table(title=f"{report['scenario']} on {report['backend']}: {verdict} in {report['duration_s']:.1f} s",
                title_justify="left")
    for col in ("expectation", "job", "ok", "detail"):
        exp.add_column(col, overflow="fold")
    for e in report["expectations"]:
        exp.add_row(e["name"], str(e.get("job") or "-"), "[green]yes[/]" if e["ok"] else "[red]no[/]", str(e["detail"]))
    parts: list[Any] = [exp]
    if report["faults"]:
        ft = Table(title="faults", title_justify="left")
        for col in ("t (s)", "kind", "target", "state then", "trigger", "recovery (s)"):
            ft.add_column(col, overflow="fold")
        for f in report["faults"]:
            rec = f["recovery_s"]
            ft.add_row("-" if f["t"] is None else f"{f['t']:.1f}", f["kind"], f["target"], f["target_state"],
                       f["trigger"] + ("" if f["fired"] else " [red](never fired)[/]"),
                       "-" if rec is None else f"{rec:.1f}")
        parts.append(ft)
    jt = Table(title="jobs", title_justify="left",
               caption="test: acc = accuracy (higher is better), ppl = perplexity (lower is better)")
    for col in ("job", "hops", "laps", "final holder", "test", "done at (s)", "bundle bytes"):
        jt.add_column(col)
    for j in report["jobs"]:
        jt.add_row(j["name"], str(j["hops"]), str(j["laps"]), str(j["final_holder"] or "-"), metric.short(j.get("test")),
                   "-" if j["completed_t"] is None else f"{j['completed_t']:.1f}", str(j["bytes_bundles"]))
    parts.append(jt)
    if report.get("error"):
        parts.append(f"[red]error:[/] {report['error']}")
    if report.get("plots"):
        parts.append("plots: " + ", ".join(Path(p).name for p in report["plots"]))
    return Group(*parts)
