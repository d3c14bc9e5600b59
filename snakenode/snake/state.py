"""job_state: the snake's own record of where it is, travelling with it hop to hop (pure, no I/O).

Decisions use this record, not each holder's private view, so a retried hop continues exactly where the
lost one began. Everything here is a pure transition `JobState -> JobState`; the node's holder and hand-off
(holder.py, handoff.py) and the CS coordinator call the same functions.

Life of one hop k, as seen by its holder H (state S_k, `holder == H`):

    S = finish_hop(S_k, metric=m, members=joined_alive)   # record H's post-hop metric; maybe close the lap
    if job_done(S, spec): announce completion
    ranking = routing.rank(...S...)                       # hard lap rule lives in lap_remaining(S)
    S1 = after_hop(S, holder=C, window=w, spec=spec)      # the state proposed to C (hop k+1, attempt 0)
    ...C declines:  S = record_decline(S, C, spec=spec, members=joined_alive)
    ...C dies:      S1b = retry(S, S1, holder=D, window=w2, spec=spec)   # hop k+1, attempt 1

A proposal that timed out may have been accepted after all (the Accept was lost), so the next candidate
should get it as a retry (attempt + 1), never at the same attempt: the later proposal then wins fencing
against a zombie acceptance. An explicit Decline needs no new attempt.

**Lineage.** `lineage_next(parent, hop, attempt, holder)` is
`sha256(parent_raw32 || u64be(hop) || u32be(attempt) || utf8(holder))` in lowercase hex, where
`parent_raw32` is the parent lineage's 32 raw bytes. Every field but the last has a fixed width, so the
concatenation is unambiguous. The parent of hop 0 is `genesis_lineage(job_id)` =
`sha256(b"snakenode/lineage/genesis\\0" || utf8(job_id))`.

**Fencing.** Claims compare by higher (lap, hop), then higher attempt, then lower lineage hash
(docs/DESIGN.md, "One snake per job"). `ancestry` keeps the last ANCESTRY_KEEP lineages of the chain so a holder can tell
its own successor's progress (a descendant) from a rival lineage.

**Laps.** `lap_members` is fixed when a lap starts (joined, alive nodes passed in by the caller); a member
is settled when visited or dropped; the lap closes (`roll_lap`) once every member is settled *and* the
current hop has finished, so the last hop's metric counts in the lap it belongs to. `lap` counts the laps
completed so far (0-based), `lap_metrics[i]` is the mean post-hop validation metric of lap i (None when
no hop of that lap reported one). Declines count "in a row" across hops and laps; an accepted hop resets
the count.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from snakenode.identity import public_key_from_peer_id
from snakenode.snake.job import target_reached
from snakenode.snake.window import Window, WindowError, next_window

ANCESTRY_KEEP = 16          # lineages kept: a holder relates to at most hops k+1 and k+2 (baton rule)
MAX_PEERS = 4096            # bounds every peer list in job_state (it arrives from the network)
MAX_LAP_METRICS = 100_000
MAX_HOP = 2**63 - 1         # hop is packed as u64 in the lineage
MAX_ATTEMPT = 2**32 - 1     # attempt is packed as u32 in the lineage
MAX_BLOCKS = 100_000
DROP_REASONS = ("declines", "down")

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_JOB_ID = re.compile(r"[0-9a-f]{16}\Z")
_GENESIS_TAG = b"snakenode/lineage/genesis\0"


class StateError(ValueError):
    """A job_state that is malformed or a transition that breaks the protocol. The message says which."""


def is_peer_id(value: object) -> bool:
    """True for an Ed25519 libp2p peer id string (the only kind snakenode uses); False for anything else,
    unhashable values included."""
    return isinstance(value, str) and 40 <= len(value) <= 64 and _is_peer_id_str(value)


@functools.lru_cache(maxsize=8192)
def _is_peer_id_str(value: str) -> bool:
    try:
        public_key_from_peer_id(value)
    except ValueError:
        return False
    return True


def genesis_lineage(job_id: str) -> str:
    """Parent lineage of hop 0: ties every lineage to its job."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise StateError(f"job_id must be 16 lowercase hex characters, got {job_id!r:.80}")
    return hashlib.sha256(_GENESIS_TAG + job_id.encode()).hexdigest()


def lineage_next(parent: str, hop: int, attempt: int, holder: str) -> str:
    """The lineage of (hop, attempt) held by `holder` after `parent` (see the module docstring)."""
    if not isinstance(parent, str) or not _HEX64.match(parent):
        raise StateError(f"parent lineage must be 64 lowercase hex characters, got {parent!r:.80}")
    if type(hop) is not int or not 0 <= hop <= MAX_HOP:
        raise StateError(f"hop must be an integer in 0..{MAX_HOP}, got {hop!r}")
    if type(attempt) is not int or not 0 <= attempt <= MAX_ATTEMPT:
        raise StateError(f"attempt must be an integer in 0..{MAX_ATTEMPT}, got {attempt!r}")
    if not isinstance(holder, str) or not holder:
        raise StateError(f"holder must be a non-empty peer id, got {holder!r:.80}")
    raw = bytes.fromhex(parent) + hop.to_bytes(8, "big") + attempt.to_bytes(4, "big") + holder.encode()
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------------------- fencing


class Claim(NamedTuple):
    """One attempt at one hop of one lineage: what fencing compares."""

    lap: int
    hop: int
    attempt: int
    lineage: str


def compare_claims(a: Claim, b: Claim) -> int:
    """+1 when `a` wins, -1 when `b` wins, 0 for the same claim: higher (lap, hop), then higher attempt,
    then the lower lineage hash (an arbitrary but global tie-break every node computes alike)."""
    ka, kb = (a.lap, a.hop, a.attempt), (b.lap, b.hop, b.attempt)
    if ka != kb:
        return 1 if ka > kb else -1
    if a.lineage == b.lineage:
        return 0
    return 1 if a.lineage < b.lineage else -1


def is_stale(incoming: Claim, known: Claim | None) -> bool:
    """True when a proposal, bundle or resume for `incoming` must be refused because this node already
    knows a claim that beats it (a later hop or attempt, or the winning lineage of a fork). The same
    claim again (a retransmission) is not stale."""
    return known is not None and compare_claims(incoming, known) < 0


# ---------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class JobState:
    """The job_state of ARCHITECTURE.md plus the fields the transitions need (see `to_dict`)."""

    job_id: str
    blocks: int
    hop: int
    attempt: int
    lineage: str
    parent_lineage: str
    lap: int
    lap_members: tuple[str, ...]
    visited: tuple[str, ...]
    window: Window
    holder: str
    prev_window: Window | None = None
    prev_holder: str | None = None
    declines: Mapping[str, int] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    drop_reasons: Mapping[str, str] = field(default_factory=dict)
    recent: tuple[str, ...] = ()
    lap_metrics: tuple[float | None, ...] = ()
    hop_metrics: tuple[float, ...] = ()
    ancestry: tuple[str, ...] = ()
    finished: bool = False

    @property
    def claim(self) -> Claim:
        return Claim(self.lap, self.hop, self.attempt, self.lineage)

    def to_dict(self) -> dict[str, Any]:
        """msgpack/JSON-able; keys are ARCHITECTURE.md's job_state keys plus job_id, blocks,
        parent_lineage, prev_window, prev_holder, drop_reasons, hop_metrics, ancestry, finished."""
        return {
            "job_id": self.job_id, "blocks": self.blocks, "hop": self.hop, "attempt": self.attempt,
            "lineage": self.lineage, "parent_lineage": self.parent_lineage, "lap": self.lap,
            "lap_members": list(self.lap_members), "visited": list(self.visited),
            "window": self.window.to_dict(),
            "prev_window": None if self.prev_window is None else self.prev_window.to_dict(),
            "declines": dict(sorted(self.declines.items())), "dropped": list(self.dropped),
            "drop_reasons": dict(sorted(self.drop_reasons.items())), "recent": list(self.recent),
            "holder": self.holder, "prev_holder": self.prev_holder,
            "lap_metrics": list(self.lap_metrics), "hop_metrics": list(self.hop_metrics),
            "ancestry": list(self.ancestry), "finished": self.finished,
        }

    @classmethod
    def from_dict(cls, d: Any) -> JobState:
        """Strict decoding of a job_state that arrived from the network: every key present and known,
        every type and range checked, the lineage recomputed. Raises StateError naming the key."""
        return _decode(d)


_KEYS = frozenset(JobState(
    "0" * 16, 1, 0, 0, "0" * 64, "0" * 64, 0, (), (), Window(0, 1), "x").to_dict())


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = d[key]
    if type(v) is not int or not lo <= v <= hi:
        raise StateError(f"job_state.{key} must be an integer in {lo}..{hi}, got {v!r:.80}")
    return v


def _hex64(d: Mapping[str, Any], key: str) -> str:
    v = d[key]
    if not isinstance(v, str) or not _HEX64.match(v):
        raise StateError(f"job_state.{key} must be 64 lowercase hex characters, got {v!r:.80}")
    return v


def _peer(v: Any, key: str) -> str:
    if not is_peer_id(v):
        raise StateError(f"job_state.{key}: {v!r:.80} is not an Ed25519 peer id")
    return v


def _peers(d: Mapping[str, Any], key: str, limit: int = MAX_PEERS) -> tuple[str, ...]:
    v = d[key]
    if not isinstance(v, list | tuple) or len(v) > limit:
        raise StateError(f"job_state.{key} must be a list of at most {limit} peer ids")
    out = tuple(_peer(p, key) for p in v)
    if len(set(out)) != len(out) and key != "recent":
        raise StateError(f"job_state.{key} lists a peer twice")
    return out


def _metric(v: Any, key: str, none_ok: bool) -> float | None:
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise StateError(f"job_state.{key} values must be finite numbers{' or null' if none_ok else ''}, "
                         f"got {v!r:.80}")
    return float(v)


def _window(v: Any, key: str, blocks: int) -> Window:
    try:
        w = Window.from_dict(v)
    except WindowError as exc:
        raise StateError(f"job_state.{key}: {exc}") from None
    if not w.fits(blocks):
        raise StateError(f"job_state.{key}: {w} runs past the last block ({blocks} blocks)")
    return w


def _decode(d: Any) -> JobState:
    if not isinstance(d, Mapping):
        raise StateError("job_state must be a map")
    missing, unknown = _KEYS - set(d), set(d) - _KEYS
    if missing or unknown:
        raise StateError(f"job_state: missing keys {sorted(missing)}, unknown keys {sorted(map(str, unknown))}")
    job_id = d["job_id"]
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise StateError(f"job_state.job_id must be 16 lowercase hex characters, got {job_id!r:.80}")
    blocks = _int(d, "blocks", 1, MAX_BLOCKS)
    hop, attempt = _int(d, "hop", 0, MAX_HOP), _int(d, "attempt", 0, MAX_ATTEMPT)
    lineage, parent = _hex64(d, "lineage"), _hex64(d, "parent_lineage")
    holder = _peer(d["holder"], "holder")
    if lineage != lineage_next(parent, hop, attempt, holder):
        raise StateError("job_state.lineage does not match (parent_lineage, hop, attempt, holder)")
    if hop == 0 and parent != genesis_lineage(job_id):
        raise StateError("job_state.parent_lineage of hop 0 must be the job's genesis lineage")
    prev_holder = None if d["prev_holder"] is None else _peer(d["prev_holder"], "prev_holder")
    declines = d["declines"]
    if not isinstance(declines, Mapping) or len(declines) > MAX_PEERS:
        raise StateError(f"job_state.declines must be a map of at most {MAX_PEERS} peer ids to counts")
    for p, n in declines.items():
        _peer(p, "declines")
        if type(n) is not int or not 1 <= n <= MAX_ATTEMPT:
            raise StateError(f"job_state.declines[{p}] must be an integer >= 1, got {n!r:.80}")
    reasons = d["drop_reasons"]
    if not isinstance(reasons, Mapping) or len(reasons) > MAX_PEERS:
        raise StateError("job_state.drop_reasons must be a map of peer ids to reasons")
    for p, r in reasons.items():
        _peer(p, "drop_reasons")
        if r not in DROP_REASONS:
            raise StateError(f"job_state.drop_reasons[{p}] must be one of {', '.join(DROP_REASONS)}")
    lap_metrics, hop_metrics = d["lap_metrics"], d["hop_metrics"]
    for key, v in (("lap_metrics", lap_metrics), ("hop_metrics", hop_metrics)):
        if not isinstance(v, list | tuple) or len(v) > MAX_LAP_METRICS:
            raise StateError(f"job_state.{key} must be a list of at most {MAX_LAP_METRICS} numbers")
    ancestry = d["ancestry"]
    if not isinstance(ancestry, list | tuple) or len(ancestry) > ANCESTRY_KEEP:
        raise StateError(f"job_state.ancestry must be a list of at most {ANCESTRY_KEEP} lineages")
    if not all(isinstance(a, str) and _HEX64.match(a) for a in ancestry):
        raise StateError("job_state.ancestry must hold 64-character lowercase hex lineages")
    if ancestry and ancestry[-1] != parent:
        raise StateError("job_state.ancestry must end with parent_lineage")
    if type(d["finished"]) is not bool:
        raise StateError("job_state.finished must be true or false")
    prev_window = None if d["prev_window"] is None else _window(d["prev_window"], "prev_window", blocks)
    window = _window(d["window"], "window", blocks)
    if window != next_window(prev_window, window.size, blocks):
        raise StateError(f"job_state.window {window} does not follow {prev_window} (serpentine policy)")
    return JobState(
        job_id=job_id, blocks=blocks, hop=hop, attempt=attempt, lineage=lineage, parent_lineage=parent,
        lap=_int(d, "lap", 0, MAX_HOP), lap_members=_peers(d, "lap_members"), visited=_peers(d, "visited"),
        window=window, holder=holder, prev_window=prev_window, prev_holder=prev_holder,
        declines=dict(declines), dropped=_peers(d, "dropped"), drop_reasons=dict(reasons),
        recent=_peers(d, "recent", 1024),
        lap_metrics=tuple(_metric(v, "lap_metrics", True) for v in lap_metrics),
        hop_metrics=tuple(_metric(v, "hop_metrics", False) for v in hop_metrics),  # type: ignore[misc]
        ancestry=tuple(ancestry), finished=d["finished"],
    )


def in_lineage(state: JobState, lineage: str) -> bool:
    """True when `lineage` is this state's own or one of its recent ancestors (same snake, not a rival)."""
    return lineage == state.lineage or lineage in state.ancestry


# ---------------------------------------------------------------------------------------------- laps


def lap_remaining(state: JobState) -> list[str]:
    """Members of the current lap still to visit (neither visited nor dropped), sorted."""
    settled = set(state.visited) | set(state.dropped)
    return sorted(m for m in state.lap_members if m not in settled)


def lap_complete(state: JobState) -> bool:
    return not lap_remaining(state)


def _members(members: Collection[str]) -> tuple[str, ...]:
    out = tuple(sorted(set(members)))
    if not out:
        raise StateError("a lap needs at least one member (the joined, alive nodes, this one included)")
    if len(out) > MAX_PEERS:
        raise StateError(f"a lap has at most {MAX_PEERS} members")
    for p in out:
        _peer(p, "lap_members")
    return out


def _window_for(prev: Window | None, window: Window | int, blocks: int) -> Window:
    size = window if isinstance(window, int) else window.size
    expected = next_window(prev, size, blocks)
    if isinstance(window, Window) and window != expected:
        raise StateError(f"window {window} does not follow {prev}: the serpentine policy gives {expected}")
    return expected


def start_job(job_id: str, members: Collection[str], first_holder: str, window: Window | int, blocks: int,
              *, attempt: int = 0) -> JobState:
    """The state of hop 0 (lap 0) held by `first_holder`; `window` is a Window or just its size."""
    if type(blocks) is not int or not 1 <= blocks <= MAX_BLOCKS:
        raise StateError(f"blocks must be an integer in 1..{MAX_BLOCKS}, got {blocks!r}")
    parent = genesis_lineage(job_id)
    holder = _peer(first_holder, "holder")
    return JobState(
        job_id=job_id, blocks=blocks, hop=0, attempt=attempt,
        lineage=lineage_next(parent, 0, attempt, holder), parent_lineage=parent, lap=0,
        lap_members=_members(members), visited=(holder,), window=_window_for(None, window, blocks),
        holder=holder, recent=(holder,),
    )


def finish_hop(state: JobState, *, metric: float | None, members: Collection[str]) -> JobState:
    """Record the holder's post-hop validation metric and close the lap if this hop completed it.

    `members`: the joined, alive nodes now; they become the next lap's members if the lap closes.
    """
    if state.finished:
        raise StateError(f"hop {state.hop} already finished (its metric is recorded once)")
    hop_metrics = state.hop_metrics
    if metric is not None:
        hop_metrics = (*hop_metrics, _metric(metric, "metric", False))  # type: ignore[assignment]
    return roll_lap(replace(state, hop_metrics=hop_metrics, finished=True), members)


def roll_lap(state: JobState, members: Collection[str]) -> JobState:
    """Start the next lap when the current one is complete (else unchanged). Call it after any drop."""
    if not state.finished or not lap_complete(state):
        return state
    mean = sum(state.hop_metrics) / len(state.hop_metrics) if state.hop_metrics else None
    return replace(state, lap=state.lap + 1, lap_members=_members(members), visited=(), dropped=(),
                   drop_reasons={}, lap_metrics=(*state.lap_metrics, mean), hop_metrics=())


def job_done(state: JobState, spec: Mapping[str, Any],
             lap_metrics: Collection[float | None] | None = None) -> bool:
    """True when `spec["laps"]` laps are complete, or the target metric is reached as the mean post-hop
    validation metric over the last full lap (accuracy: >= target; perplexity: <= target)."""
    if state.lap >= spec["laps"]:
        return True
    metrics = list(state.lap_metrics if lap_metrics is None else lap_metrics)
    last = metrics[-1] if metrics else None
    return bool(spec.get("target_metric")) and last is not None and target_reached(spec, last)


def after_hop(state: JobState, holder: str, window: Window | int, *, spec: Mapping[str, Any],
              attempt: int = 0) -> JobState:
    """The state proposed to `holder` for the next hop, from the finished (and rolled) state of this one.

    `window` is the next Window or just its size (the serpentine position follows from `state.window`).
    """
    if not state.finished:
        raise StateError(f"hop {state.hop} has not finished: call finish_hop first")
    if lap_complete(state):
        raise StateError(f"lap {state.lap} is complete but not rolled: call roll_lap with the members")
    holder = _peer(holder, "holder")
    hop = state.hop + 1
    recent_hops = int(spec["routing"]["recent_hops"])
    declines = {p: n for p, n in state.declines.items() if p != holder}
    return replace(
        state, hop=hop, attempt=attempt, lineage=lineage_next(state.lineage, hop, attempt, holder),
        parent_lineage=state.lineage, ancestry=(*state.ancestry, state.lineage)[-ANCESTRY_KEEP:],
        visited=state.visited if holder in state.visited else (*state.visited, holder),
        recent=(*state.recent, holder)[-recent_hops:], declines=declines,
        prev_window=state.window, window=_window_for(state.window, window, state.blocks),
        holder=holder, prev_holder=state.holder, finished=False,
    )


def retry(base: JobState | None, failed: JobState, holder: str, window: Window | int, *,
          spec: Mapping[str, Any]) -> JobState:
    """The next attempt (attempt + 1, same hop) of the hop `failed` proposed, now to `holder`.

    It is rebuilt from the predecessor's own state `base` (None for hop 0), not patched from `failed`:
    drops since then may have closed the lap, and the lap rule must see that.
    """
    if failed.attempt >= MAX_ATTEMPT:
        raise StateError("attempt counter exhausted")
    if base is None:
        if failed.hop != 0:
            raise StateError(f"retrying hop {failed.hop} needs the predecessor's state")
        return start_job(failed.job_id, failed.lap_members, holder, window, failed.blocks,
                         attempt=failed.attempt + 1)
    if failed.hop != base.hop + 1 or failed.parent_lineage != base.lineage:
        raise StateError(f"hop {failed.hop} attempt {failed.attempt} does not follow this node's "
                         f"hop {base.hop}: it cannot retry it")
    return after_hop(base, holder, window, spec=spec, attempt=failed.attempt + 1)


def resize(state: JobState, size: int) -> JobState:
    """The proposed state with the window the receiver can take (Accept may shrink or grow it)."""
    return replace(state, window=next_window(state.prev_window, size, state.blocks))


def drop_member(state: JobState, peer: str, reason: str, *, members: Collection[str]) -> JobState:
    """Drop `peer` from the current lap (reason "declines" or "down") so it no longer blocks the lap;
    rolls the lap when that completes it. A peer outside the lap, or already settled, is left alone."""
    if reason not in DROP_REASONS:
        raise StateError(f"drop reason must be one of {', '.join(DROP_REASONS)}, got {reason!r}")
    if peer not in state.lap_members or peer in state.dropped or peer in state.visited:
        return state
    dropped = replace(state, dropped=(*state.dropped, peer),
                      drop_reasons={**state.drop_reasons, peer: reason})
    return roll_lap(dropped, members)


def record_decline(state: JobState, peer: str, *, spec: Mapping[str, Any], members: Collection[str]) -> JobState:
    """Count a decline (or unanswered proposal) by `peer`; drop it after `lap.max_declines` in a row."""
    peer = _peer(peer, "declines")
    n = state.declines.get(peer, 0) + 1
    state = replace(state, declines={**state.declines, peer: n})
    if n >= int(spec["lap"]["max_declines"]):
        state = drop_member(state, peer, "declines", members=members)
    return state


def drop_down(state: JobState, down_for_s: Mapping[str, float], *, spec: Mapping[str, Any],
              members: Collection[str]) -> JobState:
    """Drop unvisited lap members that have been down for at least `lap.drop_after_s` seconds.

    `down_for_s`: peer -> seconds since it was last seen alive (the caller owns the clock).
    """
    limit = float(spec["lap"]["drop_after_s"])
    for peer in lap_remaining(state):
        if down_for_s.get(peer, 0.0) >= limit:
            state = drop_member(state, peer, "down", members=members)
    return state
