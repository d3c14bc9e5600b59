"""Hop log: one JSON record per protocol event, kept per job by every node, merged by `watch` and `jobs`.

A record is always *about one hop attempt*: its (hop, attempt, lineage, parent_lineage, lap, holder,
window) are those of the job_state the event concerns (for `proposed`/`declined` that is the state
proposed to the would-be holder), `node` is the peer that wrote it and `t` is the writer's clock. Because
the lineage is recomputable from (parent_lineage, hop, attempt, holder), the merged logs of every node can
be checked offline: `validate_log` rebuilds the surviving lineage and checks that its hops are
contiguous, that one lineage at most reached the end, and that its windows follow the serpentine policy.
Schema: docs/hoplog-schema.md. Only `append_record` and `read_log` touch files.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from snakenode.snake.state import (
    Claim,
    JobState,
    StateError,
    compare_claims,
    genesis_lineage,
    is_peer_id,
    lineage_next,
)
from snakenode.snake.window import Window, WindowError, check_sequence

# In lifecycle order: records with the same (hop, attempt, t) sort in this order.
EVENTS = (
    "resumed",        # a node restarted from its checkpoint and resumes this hop
    "received",       # the holder has the complete, verified bundle for this hop
    "train_start",
    "trained",        # window trained; metrics_before/after, t_train_start/end
    "lap_complete",   # this hop closed a lap; lap = laps now complete, detail.metric = the lap's mean
    "job_complete",   # the job ended after this hop (laps or target); this holder has the final model
    "proposed",       # record about the proposed next hop (holder = the candidate)
    "declined",       # the candidate declined or timed out; detail.reason
    "dropped",        # a lap member was dropped; detail.peer, detail.reason (declines | down)
    "accepted",       # the candidate accepted; window = the window it takes
    "handoff",        # bundle sent; bytes.bundle_out, t_handoff
    "committed",      # the successor acknowledged the complete bundle (all hashes verified)
    "released",       # the baton was released (the successor handed on hop k+2)
    "retry",          # the predecessor retries this hop as a new attempt (detail.failed_holder)
    "reassigned",     # Reassigned(job, hop, attempt, new_holder) seen on the progress topic
    "superseded",     # this attempt or lineage lost to a later one; the node stopped it
)
EVENT_ORDER = {e: i for i, e in enumerate(EVENTS)}
BYTES_KEYS = ("bundle_in", "bundle_out", "negotiate", "gossip")
TIME_KEYS = ("t_recv", "t_train_start", "t_train_end", "t_handoff")
RECORD_KEYS = ("job_id", "event", "hop", "attempt", "lineage", "parent_lineage", "lap", "holder",
               "prev_holder", "node", "t", "window", "trained", "metrics_before", "metrics_after", "bytes",
               *TIME_KEYS, "detail")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_JOB_ID = re.compile(r"[0-9a-f]{16}\Z")
# Events whose window is the one actually trained (others may carry a proposal's window).
_TRAIN_EVENTS = ("trained", "train_start")


class HopLogError(ValueError):
    """A record that breaks the hop-log schema (refused before it is written)."""


# ---------------------------------------------------------------------------------------------- records


def make_record(event: str, *, job_id: str, hop: int, attempt: int, lineage: str, lap: int, holder: str,
                node: str, t: float, parent_lineage: str | None = None, prev_holder: str | None = None,
                window: Window | Mapping[str, int] | None = None, trained: Mapping[str, bool] | None = None,
                metrics_before: Mapping[str, float] | None = None,
                metrics_after: Mapping[str, float] | None = None, bytes: Mapping[str, int] | None = None,
                t_recv: float | None = None, t_train_start: float | None = None,
                t_train_end: float | None = None, t_handoff: float | None = None,
                detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One hop-log record with every schema key present (None where an event has nothing to say)."""
    counts = {k: 0 for k in BYTES_KEYS}
    counts.update(bytes or {})
    rec = {
        "job_id": job_id, "event": event, "hop": hop, "attempt": attempt, "lineage": lineage,
        "parent_lineage": parent_lineage, "lap": lap, "holder": holder, "prev_holder": prev_holder,
        "node": node, "t": t,
        "window": window.to_log() if isinstance(window, Window) else (dict(window) if window else None),
        "trained": None if trained is None else {"stem": trained["stem"], "head": trained["head"]},
        "metrics_before": None if metrics_before is None else dict(metrics_before),
        "metrics_after": None if metrics_after is None else dict(metrics_after),
        "bytes": counts, "t_recv": t_recv, "t_train_start": t_train_start, "t_train_end": t_train_end,
        "t_handoff": t_handoff, "detail": None if detail is None else dict(detail),
    }
    problems = validate_record(rec)
    if problems:
        raise HopLogError(f"hop-log record {event!r}: " + "; ".join(problems))
    return rec


def from_state(event: str, state: JobState, *, node: str, t: float, **fields: Any) -> dict[str, Any]:
    """A record about `state`'s hop attempt (job, hop, attempt, lineage, lap, holders, window from it)."""
    fields.setdefault("window", state.window)
    return make_record(event, job_id=state.job_id, hop=state.hop, attempt=state.attempt,
                       lineage=state.lineage, parent_lineage=state.parent_lineage, lap=state.lap,
                       holder=state.holder, prev_holder=state.prev_holder, node=node, t=t, **fields)


def _num(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def _nat(v: Any) -> bool:
    return type(v) is int and v >= 0


def validate_record(rec: Any) -> list[str]:
    """Problems with one record; [] when it follows the schema. Unknown extra keys are tolerated (newer
    nodes may add fields); known keys must all be present with the right types."""
    if not isinstance(rec, Mapping):
        return ["record is not a map"]
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        return [f"missing keys {missing}"]
    p: list[str] = []
    if not isinstance(rec["event"], str) or rec["event"] not in EVENT_ORDER:
        p.append(f"event {rec['event']!r:.40} is not one of the known events")
    if not isinstance(rec["job_id"], str) or not _JOB_ID.match(rec["job_id"]):
        p.append("job_id must be 16 lowercase hex characters")
    for k in ("hop", "attempt", "lap"):
        if not _nat(rec[k]):
            p.append(f"{k} must be an integer >= 0")
    for k in ("lineage", "parent_lineage"):
        v = rec[k]
        if not (isinstance(v, str) and _HEX64.match(v)) and not (k == "parent_lineage" and v is None):
            p.append(f"{k} must be 64 lowercase hex characters")
    for k in ("holder", "node", "prev_holder"):
        if not is_peer_id(rec[k]) and not (k == "prev_holder" and rec[k] is None):
            p.append(f"{k} must be a peer id")
    if not _num(rec["t"]):
        p.append("t must be a finite number (unix seconds)")
    if rec["window"] is not None:
        try:
            Window.from_log(rec["window"])
        except WindowError as exc:
            p.append(str(exc))
    tr = rec["trained"]
    if tr is not None and not (isinstance(tr, Mapping) and set(tr) == {"stem", "head"}
                               and all(type(v) is bool for v in tr.values())):
        p.append("trained must be {stem: bool, head: bool} or null")
    for k in ("metrics_before", "metrics_after"):
        m = rec[k]
        if m is not None and not (isinstance(m, Mapping) and all(isinstance(a, str) and _num(b)
                                                                 for a, b in m.items())):
            p.append(f"{k} must map names to finite numbers, or be null")
    b = rec["bytes"]
    if not (isinstance(b, Mapping) and set(b) == set(BYTES_KEYS) and all(_nat(v) for v in b.values())):
        p.append(f"bytes must be {{{', '.join(BYTES_KEYS)}}} with integers >= 0")
    times = [(k, rec[k]) for k in TIME_KEYS if rec[k] is not None]
    if any(not _num(v) for _, v in times):
        p.append(f"{', '.join(TIME_KEYS)} must be finite numbers or null")
    elif any(a[1] > b_[1] for a, b_ in zip(times, times[1:], strict=False)):
        p.append("times must not decrease: t_recv <= t_train_start <= t_train_end <= t_handoff")
    if rec["detail"] is not None and not isinstance(rec["detail"], Mapping):
        p.append("detail must be a map or null")
    if rec["event"] == "trained":
        for k in ("window", "trained", "metrics_after", "t_train_start", "t_train_end"):
            if rec[k] is None:
                p.append(f"a trained record needs {k}")
    if not p and rec["parent_lineage"] is not None:
        try:
            if lineage_next(rec["parent_lineage"], rec["hop"], rec["attempt"], rec["holder"]) != rec["lineage"]:
                p.append("lineage does not match (parent_lineage, hop, attempt, holder)")
        except StateError as exc:
            p.append(str(exc))
        if rec["hop"] == 0 and rec["parent_lineage"] != genesis_lineage(rec["job_id"]):
            p.append("hop 0's parent_lineage must be the job's genesis lineage")
    return p


# ---------------------------------------------------------------------------------------------- files


def append_record(path: str | Path, rec: Mapping[str, Any], *, fsync: bool = False) -> None:
    """Append one validated record as a JSON line (one write, so concurrent appenders never interleave)."""
    problems = validate_record(rec)
    if problems:
        raise HopLogError("refusing to log an invalid record: " + "; ".join(problems))
    line = json.dumps(rec, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_log(path: str | Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """Records of one JSONL file. A line that is not a JSON object (a crash can cut the last line short)
    is skipped, or with `strict` raises HopLogError naming the line."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                if strict:
                    raise HopLogError(f"{path}:{n}: not a JSON object")
                continue
            out.append(rec)
    return out


def _sort_key(rec: Mapping[str, Any]) -> tuple[Any, ...]:
    t = rec.get("t")
    return (rec.get("hop", 0), rec.get("attempt", 0), t if _num(t) else 0.0,
            EVENT_ORDER.get(rec.get("event"), len(EVENTS)), str(rec.get("node")), str(rec.get("lineage")))


def merge(*logs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records of several nodes' logs, exact duplicates removed, ordered by (hop, attempt, t, event)."""
    seen: set[str] = set()
    out = []
    for log in logs:
        for rec in log:
            key = json.dumps(rec, sort_keys=True, separators=(",", ":"), default=str)
            if key not in seen:
                seen.add(key)
                out.append(dict(rec))
    out.sort(key=_sort_key)
    return out


# ---------------------------------------------------------------------------------------------- whole logs


def _claim(rec: Mapping[str, Any]) -> Claim:
    return Claim(rec["lap"], rec["hop"], rec["attempt"], rec["lineage"])


def surviving_chain(records: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records of the surviving lineage, grouped per hop, oldest hop first.

    The end is the lineage that logged `job_complete` (the highest one if several did, which
    `validate_log` reports), else the highest claim that trained; the chain follows parent_lineage back as
    far as the log reaches. Records must be valid (see `validate_record`)."""
    by_lineage: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_lineage.setdefault(rec["lineage"], []).append(dict(rec))
    ends = [r for r in records if r["event"] == "job_complete"] or \
           [r for r in records if r["event"] in ("trained", "committed", "received")]
    if not ends:
        return []
    end = ends[0]
    for r in ends[1:]:
        if compare_claims(_claim(r), _claim(end)) > 0:
            end = r
    chain = []
    lineage: str | None = end["lineage"]
    while lineage is not None and lineage in by_lineage and len(chain) <= len(by_lineage):
        group = sorted(by_lineage[lineage], key=_sort_key)
        chain.append(group)
        lineage = next((r["parent_lineage"] for r in group if r["parent_lineage"] is not None), None)
    chain.reverse()
    return chain


def chain_windows(records: Sequence[Mapping[str, Any]]) -> list[Window | None]:
    """The window each hop of the surviving lineage trained (None where the log lacks it)."""
    out: list[Window | None] = []
    for group in surviving_chain(records):
        trained = sorted((r for r in group if r["event"] in _TRAIN_EVENTS and r["window"] is not None),
                         key=lambda r: _TRAIN_EVENTS.index(r["event"]))
        out.append(Window.from_log(trained[0]["window"]) if trained else None)
    return out


HANDOFF_PHASES = ("decide", "negotiate", "transfer", "load", "total")


def handoff_latency(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and max seconds of each hand-off phase along the surviving lineage, from train end on one node
    to train start on the next: decide (routing, up to the first proposal), negotiate (the accepted
    proposal), transfer (the bundle), load (into the worker). Wall clocks of different hosts are compared, so
    across machines the figures are only as good as their clock sync; on one host they are exact."""
    chain = surviving_chain(records)
    rows: list[tuple[float, ...]] = []

    def times(group: list[dict[str, Any]], event: str) -> list[float]:
        return [r["t"] for r in group if r["event"] == event]

    for prev, group in itertools.pairwise(chain):
        trained, proposed, accepted = times(prev, "trained"), times(group, "proposed"), times(group, "accepted")
        received, started = times(group, "received"), times(group, "train_start")
        if not (trained and proposed and accepted and received and started):
            continue
        t_trained, t_accepted, t_start = min(trained), max(accepted), min(started)
        # After a retry the phase that counts is the proposal that was accepted, not the first one.
        t_asked = max((t for t in proposed if t <= t_accepted), default=min(proposed))
        t_received = max(received)
        rows.append((min(proposed) - t_trained, t_accepted - t_asked, t_received - t_accepted,
                     t_start - t_received, t_start - t_trained))
    out: dict[str, Any] = {"handoffs": len(rows)}
    for i, name in enumerate(HANDOFF_PHASES):
        xs = sorted(max(0.0, r[i]) for r in rows)
        out[name] = {"median_s": round(xs[len(xs) // 2], 4), "max_s": round(xs[-1], 4)} if xs else None
    return out


def validate_log(records: Sequence[Mapping[str, Any]], blocks: int) -> list[str]:
    """Problems with a job's merged log; [] when it is sound: every record valid, one job, at most one
    lineage reaches `job_complete`, the surviving lineage's hops are contiguous from hop 0 when it
    completed, laps never go back, and its trained windows follow the serpentine policy."""
    problems = [f"record {i} ({r.get('event') if isinstance(r, Mapping) else '?'}): {p}"
                for i, r in enumerate(records) for p in validate_record(r)]
    if problems:
        return problems
    jobs = {r["job_id"] for r in records}
    if len(jobs) > 1:
        return [f"the log mixes {len(jobs)} jobs: {sorted(jobs)}"]
    facts: dict[str, tuple[Any, ...]] = {}
    for r in records:
        fact = (r["hop"], r["attempt"], r["holder"])  # records with a parent_lineage were verified above
        if facts.setdefault(r["lineage"], fact) != fact:
            problems.append(f"lineage {r['lineage'][:12]} is logged with two different hops or holders")
    finals = sorted({r["lineage"] for r in records if r["event"] == "job_complete"})
    if len(finals) > 1:
        problems.append(f"{len(finals)} lineages reached job_complete (exactly one may): "
                        f"{[f[:12] for f in finals]}")
    chain = surviving_chain(records)
    if not chain:
        return problems
    hops = [g[0]["hop"] for g in chain]
    if hops != list(range(hops[0], hops[0] + len(hops))):
        problems.append(f"surviving lineage hops are not contiguous: {hops}")
    if finals and hops[0] != 0:
        problems.append(f"the completed lineage can be traced back only to hop {hops[0]} "
                        f"(parent {chain[0][0]['parent_lineage']!s:.12} is not in the log)")
    laps = [min(r["lap"] for r in g) for g in chain]  # lap_complete/job_complete carry the next lap
    for (h, a), b in zip(zip(hops, laps, strict=True), laps[1:], strict=False):
        if not a <= b <= a + 1:
            problems.append(f"lap goes from {a} to {b} after hop {h} (laps never go back or skip)")
    for h, g in zip(hops, chain, strict=True):
        seen = {json.dumps(r["window"], sort_keys=True) for r in g if r["event"] in _TRAIN_EVENTS and r["window"]}
        if len(seen) > 1:
            problems.append(f"hop {h}: train_start and trained disagree on the window ({sorted(seen)})")
    windows = chain_windows(records)
    if finals:
        missing = [h for h, g in zip(hops, chain, strict=True) if not any(r["event"] == "trained" for r in g)]
        if missing:
            problems.append(f"hops {missing} of the completed lineage have no trained record")
    # Check the policy over each run of consecutive hops whose windows are known.
    run: list[Window] = []
    run_start = hops[0]
    for h, w in [*zip(hops, windows, strict=True), (None, None)]:
        if w is None:
            if run:
                problems.extend(check_sequence(run, blocks, from_first=run_start == 0, first_hop=run_start))
            run = []
            run_start = (h or 0) + 1
        else:
            run.append(w)
    return problems
