"""What happened in a run, from the merged hop logs and the runner's own fault log. Pure functions.

Vocabulary: a *claim* is one hop attempt (hop, attempt, lineage) and its records; the *surviving chain* is
the lineage followed back from `job_complete` (snake/hoplog.py); a *rival* is any claim off that chain
(a holder killed mid-hop, the losing side of a partition). Times are unix seconds; every host here shares
one clock (one machine), which is what makes cross-node durations meaningful.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from snakenode.snake import hoplog

# Records that show a claim doing work (not just being proposed to someone).
# `superseded` counts too: it is the moment a rival stopped.
ACTIVE_EVENTS = ("received", "train_start", "trained", "handoff", "committed", "proposed", "accepted",
                 "lap_complete", "job_complete", "resumed", "superseded")
READY_MARGIN_S = 1.0  # a host must be seen ready this long before a lap starts to count as a member
# (its profile must reach the holder; the runner sees readiness up to STATUS_POLL_S late, which adds slack)


@dataclass
class FaultRecord:
    """One fault the runner applied (or saw a node's hook fire). `t` is unix seconds, None if never fired."""

    index: int
    kind: str
    target: str
    hosts: list[str]  # the hosts it took away (for partitions: the side without the surviving lineage: all)
    trigger: str
    t: float | None = None
    target_state: str = "n/a"
    ends: float | None = None  # when its effect ended (continue, heal, host ready again); None = never
    detail: dict[str, Any] = field(default_factory=dict)
    scheduled: bool = True  # False for the automatic inverse of a `duration_s`

    @property
    def fired(self) -> bool:
        return self.t is not None


@dataclass
class Claim:
    hop: int
    attempt: int
    lineage: str
    lap: int
    holder: str
    prev_holder: str | None
    records: list[dict[str, Any]]
    surviving: bool = False

    def first(self, event: str) -> dict[str, Any] | None:
        for r in self.records:
            if r["event"] == event and r["node"] == self.holder:
                return r
        for r in self.records:
            if r["event"] == event:
                return r
        return None

    def count(self, event: str) -> int:
        return sum(1 for r in self.records if r["event"] == event)

    @property
    def last_active(self) -> float | None:
        ts = [r["t"] for r in self.records if r["event"] in ACTIVE_EVENTS and r["node"] == self.holder]
        return max(ts) if ts else None


def claims(records: Sequence[Mapping[str, Any]]) -> list[Claim]:
    """Records grouped per hop attempt; `proposed`/`declined`/`accepted` about candidates that never received
    the bundle are left out (a proposal is not a claim until committed)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["lineage"], []).append(dict(r))
    chain = {g[0]["lineage"] for g in hoplog.surviving_chain(records)} if records else set()
    out = []
    for lineage, recs in groups.items():
        if not any(r["event"] in ("received", "train_start", "trained", "committed", "resumed") for r in recs):
            continue
        r0 = recs[0]
        recs.sort(key=lambda r: (r["t"], hoplog.EVENT_ORDER.get(r["event"], 99)))
        lap = min(r["lap"] for r in recs)
        out.append(Claim(r0["hop"], r0["attempt"], lineage, lap, r0["holder"], r0["prev_holder"], recs,
                         surviving=lineage in chain))
    out.sort(key=lambda c: (c.hop, c.attempt, c.records[0]["t"]))
    return out


def chain(cs: Iterable[Claim]) -> list[Claim]:
    return sorted((c for c in cs if c.surviving), key=lambda c: c.hop)


def completion(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The `job_complete` record of the surviving lineage (the highest, if a broken run has several)."""
    finals = [r for r in records if r["event"] == "job_complete"]
    if not finals:
        return None
    return dict(max(finals, key=lambda r: (r["lap"], r["hop"], r["attempt"], -int(r["lineage"], 16))))


def test_accuracy(final: Mapping[str, Any] | None) -> float | None:
    if not final:
        return None
    test = (final.get("detail") or {}).get("test") or {}
    acc = test.get("accuracy")
    return float(acc) if isinstance(acc, int | float) else None


def hops_redone(cs: Sequence[Claim]) -> tuple[int, list[str]]:
    """Training work done twice: every `train_start` beyond the first per hop number, across attempts and
    lineages (a retried hop, a resumed one that trains again, the losing side of a partition)."""
    per_hop: dict[int, int] = {}
    for c in cs:
        per_hop[c.hop] = per_hop.get(c.hop, 0) + c.count("train_start")
    redone = {h: n - 1 for h, n in per_hop.items() if n > 1}
    return sum(redone.values()), [f"hop {h}: trained {n + 1} times" for h, n in sorted(redone.items())]


def window_sizes(cs: Sequence[Claim]) -> list[int]:
    sizes = []
    for c in cs:
        r = c.first("trained") or c.first("train_start")
        if r and r.get("window"):
            sizes.append(int(r["window"]["end"]) - int(r["window"]["start"]))
    return sizes


@dataclass
class Lap:
    index: int
    start: float
    end: float | None
    holders: list[str]  # peer ids, in hop order
    dropped: list[str]


def laps(cs: Sequence[Claim]) -> list[Lap]:
    """Laps of the surviving chain: a lap starts when the previous one closed (hop 0 for lap 0)."""
    ch = chain(cs)
    if not ch:
        return []
    out: list[Lap] = []
    first = ch[0].first("received") or ch[0].records[0]
    start = float(first["t"])
    current: Lap | None = None
    for c in ch:
        trained = c.first("trained")
        lap = c.lap if trained is None else int(trained["lap"])
        if current is None or lap != current.index:
            current = Lap(lap, start, None, [], [])
            out.append(current)
        current.holders.append(c.holder)
        current.dropped += [str((r.get("detail") or {}).get("peer")) for r in c.records if r["event"] == "dropped"]
        closed = c.first("lap_complete")
        if closed is not None:
            current.end = float(closed["t"])
            start = current.end
    return out


def available(name: str, ready_times: Sequence[float], faults: Sequence[FaultRecord], start: float,
              end: float) -> bool:
    """Whether a host was ready before `start` (with margin) and untouched by any fault until `end`."""
    if not any(t <= start - READY_MARGIN_S for t in ready_times):
        return False
    for f in faults:
        if f.t is None or name not in f.hosts:
            continue
        f_end = f.ends if f.ends is not None else float("inf")
        if f.t <= end and f_end >= start - READY_MARGIN_S:
            return False
    return True


def first_surviving_receipt_after(cs: Sequence[Claim], t: float) -> float | None:
    ts = []
    for c in chain(cs):
        r = c.first("received")
        if r is not None and r["t"] > t:
            ts.append(float(r["t"]))
    return min(ts) if ts else None


def rival_activity_after(cs: Sequence[Claim], t: float) -> list[tuple[float, Claim]]:
    """(time, claim) of every rival claim's work logged after `t`, latest first."""
    out = []
    for c in cs:
        if c.surviving:
            continue
        last = c.last_active
        if last is not None and last > t:
            out.append((last, c))
    return sorted(out, key=lambda x: -x[0])


def recovery(f: FaultRecord, cs: Sequence[Claim]) -> float | None:
    """Seconds until the snake recovered from a fault.

    heal: until the last rival lineage stopped working (0 when none was left); every other fault: until
    the surviving chain next received a bundle (the snake moving again after the fault)."""
    if f.t is None:
        return None
    if f.kind == "heal":
        rivals = rival_activity_after(cs, f.t)
        return round(max(0.0, rivals[0][0] - f.t), 3) if rivals else 0.0
    nxt = first_surviving_receipt_after(cs, f.t)
    return None if nxt is None else round(nxt - f.t, 3)
