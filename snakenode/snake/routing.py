"""Next-hop scoring: who should hold the snake next (pure: records in, ordered decision out).

The holder ranks the peers it knows from their gossiped profiles. The same inputs always give the same
list, on every node, so a retried hop and the CS coordinator decide exactly as the lost holder would have.

Eligible peers are alive, idle (or reserved for this job's next hop, i.e. by us), joined to the job, have
at least `min_memory_mb` (the memory one block needs), and were not excluded for this attempt (declined,
timed out). The lap rule is hard: while a member of the current lap is unvisited (and not dropped), only
such members are eligible, even if that means waiting; once the lap is complete, any eligible peer is a
member of the next lap (the caller rolls the lap with `state.roll_lap`).

Among eligible peers the score is

    routing.novelty * novelty + routing.compute * compute + routing.link * link     (each term in [0, 1])

- novelty: Jensen-Shannon divergence (divergence.py, nats, divided by ln 2) between the candidate's label
  histogram and the sum of the histograms of the last `routing.recent_hops` holders (counters non-IID
  drift: the snake next visits the data the model has seen least lately). No reference histogram (first
  hop, data-less holder): 1 for everyone. No candidate histogram (LM jobs): 0 when the candidate's data
  fingerprint is one of the recent holders', else 0.5 + 0.5 * tokens / (most tokens among the eligible
  with fresh data): fresh data first, and more of it preferred.
- compute: samples/s over the best samples/s among the eligible (0 when unknown).
- link: (best rtt + 1 ms) / (rtt + 1 ms) among the eligible; 0 when the rtt is unknown (not connected).

Ties go to the lower peer id. Scores are rounded to 1e-9 so float noise cannot reorder equal peers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from snakenode.snake.divergence import LN2, js_divergence
from snakenode.snake.state import JobState, lap_remaining

MAX_HIST = 100_000    # a longer label histogram in a profile is treated as absent
# Exclusion reasons, in the order they are checked.
REASONS = ("self", "bad_profile", "down", "silent", "declined", "not_joined", "visited", "dropped",
           "not_in_lap", "busy", "no_memory")


@dataclass(frozen=True)
class Candidate:
    """A peer as the holder sees it: its gossiped profile and the holder's own liveness view."""

    peer_id: str
    profile: Mapping[str, Any]
    alive: bool
    last_seen_s: float = 0.0          # seconds since this node last heard from the peer
    rtt_ms: float | None = None       # last ping round trip; None when not connected


class Choice(NamedTuple):
    peer_id: str
    score: float
    reasons: dict[str, Any]           # novelty, compute, link (each in [0, 1]), js (nats or None), lap


class Exclusion(NamedTuple):
    peer_id: str
    reason: str                       # one of REASONS (or the caller's reason for an excluded peer)


@dataclass(frozen=True)
class Ranking:
    choices: list[Choice]             # best first
    excluded: list[Exclusion]         # sorted by peer id
    lap: str                          # "current": lap rule active; "next": current lap complete
    remaining: list[str]              # unvisited, undropped members of the current lap

    @property
    def best(self) -> str | None:
        return self.choices[0].peer_id if self.choices else None


# ---------------------------------------------------------------------------------------------- profile


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
        return None
    return float(x)


def _data(profile: Mapping[str, Any]) -> Mapping[str, Any]:
    data = profile.get("data")
    return data if isinstance(data, Mapping) else {}


def label_hist(profile: Mapping[str, Any]) -> list[float] | None:
    """The profile's label histogram, or None when absent, empty or malformed (tolerant: gossip input)."""
    hist = _data(profile).get("label_hist")
    if not isinstance(hist, list) or not hist or len(hist) > MAX_HIST:
        return None
    values = [_finite(x) for x in hist]
    if any(v is None for v in values) or sum(values) <= 0:  # type: ignore[arg-type]
        return None
    return values  # type: ignore[return-value]


def _fingerprint(profile: Mapping[str, Any]) -> str | None:
    fp = _data(profile).get("fingerprint")
    return fp if isinstance(fp, str) and fp else None


def _tokens(profile: Mapping[str, Any]) -> float:
    return _finite(_data(profile).get("tokens")) or 0.0


def _samples_per_s(profile: Mapping[str, Any]) -> float:
    compute = profile.get("compute")
    return (_finite(compute.get("samples_per_s")) or 0.0) if isinstance(compute, Mapping) else 0.0


def _available(profile: Mapping[str, Any], state: JobState) -> bool:
    st = profile.get("state")
    if not isinstance(st, Mapping):
        return False
    kind = st.get("kind")
    if kind == "idle":
        return True
    hop = st.get("hop")
    return kind == "reserved" and st.get("job") == state.job_id and hop in (None, state.hop + 1)


def _joined(profile: Mapping[str, Any], job_id: str) -> bool:
    jobs = profile.get("jobs")
    return isinstance(jobs, list | tuple) and job_id in jobs


# ---------------------------------------------------------------------------------------------- ranking


def _add(total: list[float], hist: Sequence[float]) -> list[float]:
    n = max(len(total), len(hist))
    return [(total[i] if i < len(total) else 0.0) + (hist[i] if i < len(hist) else 0.0) for i in range(n)]


def rank(weights: Mapping[str, Any], state: JobState, self_id: str, candidates: Sequence[Candidate], *,
         excluded: Collection[str] | Mapping[str, str] = (), min_memory_mb: float = 0.0,
         max_silence_s: float | None = None) -> Ranking:
    """Rank `candidates` for the hop after `state` (this node, `self_id`, holds `state`).

    Args:
        weights: the job's `routing` table (novelty, compute, link, recent_hops).
        state: the holder's finished, rolled job_state.
        candidates: every peer this node knows, itself included if it has data: the recent holders'
            histograms are looked up here (this node's own record is then excluded as "self").
        excluded: peers that declined or timed out in this attempt (a mapping gives each one's reason).
        min_memory_mb: the memory the job's cheapest block needs (a peer below it cannot take any window).
        max_silence_s: exclude peers not heard from for longer (None: trust `alive` alone).

    Returns:
        The eligible peers best first, the excluded ones with the reason, and the lap in force.
    """
    ids = [c.peer_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError("rank: candidates must list each peer once")
    by_id = {c.peer_id: c for c in candidates}
    remaining = lap_remaining(state)
    in_lap = set(remaining)
    visited, dropped = set(state.visited), set(state.dropped)

    eligible: list[Candidate] = []
    out: list[Exclusion] = []
    for c in sorted(candidates, key=lambda c: c.peer_id):
        reason = _exclusion(c, state, self_id, excluded, min_memory_mb, max_silence_s, in_lap, visited,
                            dropped, bool(remaining))
        if reason is None:
            eligible.append(c)
        else:
            out.append(Exclusion(c.peer_id, reason))

    recent = list(state.recent)[-int(weights["recent_hops"]):]
    reference: list[float] = []
    recent_fps: set[str] = set()
    for pid in recent:
        holder = by_id.get(pid)
        if holder is None or not isinstance(holder.profile, Mapping):
            continue
        hist = label_hist(holder.profile)
        if hist is not None:
            reference = _add(reference, hist)
        fp = _fingerprint(holder.profile)
        if fp is not None:
            recent_fps.add(fp)

    best_sps = max((_samples_per_s(c.profile) for c in eligible), default=0.0)
    rtts = [r for c in eligible if (r := _finite(c.rtt_ms)) is not None]
    best_rtt = min(rtts, default=0.0)
    most_tokens = max((_tokens(c.profile) for c in eligible if _fingerprint(c.profile) not in recent_fps),
                      default=0.0)
    w_nov, w_cmp, w_link = (float(weights[k]) for k in ("novelty", "compute", "link"))
    lap = "current" if remaining else "next"

    choices = []
    for c in eligible:
        hist = label_hist(c.profile)
        js: float | None = None
        if hist is not None:
            if reference:
                js = js_divergence(hist, reference)
                novelty = js / LN2
            else:
                novelty = 1.0
        elif _fingerprint(c.profile) in recent_fps:
            novelty = 0.0
        else:
            novelty = 0.5 + (0.5 * _tokens(c.profile) / most_tokens if most_tokens > 0 else 0.0)
        sps = _samples_per_s(c.profile)
        compute = sps / best_sps if best_sps > 0 else 0.0
        rtt = _finite(c.rtt_ms)
        link = (best_rtt + 1.0) / (rtt + 1.0) if rtt is not None else 0.0
        score = round(w_nov * novelty + w_cmp * compute + w_link * link, 9)
        choices.append(Choice(c.peer_id, score, {
            "novelty": round(novelty, 6), "compute": round(compute, 6), "link": round(link, 6),
            "js": None if js is None else round(js, 6), "lap": lap}))
    choices.sort(key=lambda ch: (-ch.score, ch.peer_id))
    return Ranking(choices, out, lap, remaining)


def _exclusion(c: Candidate, state: JobState, self_id: str, excluded: Collection[str] | Mapping[str, str],
               min_memory_mb: float, max_silence_s: float | None, in_lap: set[str], visited: set[str],
               dropped: set[str], lap_rule: bool) -> str | None:
    """Why `c` cannot take the next hop, or None when it can (checked in REASONS order)."""
    p = c.profile
    if c.peer_id == self_id:
        return "self"
    if not isinstance(p, Mapping) or p.get("peer_id", c.peer_id) != c.peer_id:
        return "bad_profile"
    if not c.alive:
        return "down"
    if max_silence_s is not None and not (_finite(c.last_seen_s) is not None and c.last_seen_s <= max_silence_s):
        return "silent"
    if c.peer_id in excluded:
        return str(excluded[c.peer_id]) if isinstance(excluded, Mapping) else "declined"
    if not _joined(p, state.job_id):
        return "not_joined"
    if lap_rule and c.peer_id not in in_lap:
        if c.peer_id in visited:
            return "visited"
        return "dropped" if c.peer_id in dropped else "not_in_lap"
    if not _available(p, state):
        return "busy"
    memory = _finite(p.get("memory_mb"))
    if memory is None or memory < min_memory_mb:
        return "no_memory"
    return None
