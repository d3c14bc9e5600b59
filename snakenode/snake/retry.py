"""The hand-off's retry policy, pure: what the holder does next after each answer from the network.

snake/handoff.py runs the loop (propose, transfer, keep the baton) and feeds every outcome through these
functions; they only decide. `Tries` is what the holder remembers across the attempts of one hand-off: the
attempt number to propose next, the candidates excluded and why, the transfer failures per candidate, and
how long it has waited without an eligible candidate.

Exclusion reasons: `declined` and `timeout` are soft (they expire after SOFT_EXCLUSION_S of waiting, when
the network may have changed), `transfer` (a candidate whose transfer failed twice) too, and `failed`
(a successor lost after it took the hop) lasts for the whole hand-off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

SOFT_EXCLUSION_S = 5.0  # waiting this long without an eligible candidate lifts the soft exclusions
TRANSFER_FAILURES_EXCLUDE = 2  # a candidate whose transfers failed this often is excluded (soft)
HARD_EXCLUSIONS = ("failed",)


class Next(StrEnum):
    STOP = "stop"  # the job completed or this hop was superseded: nothing left to do
    SUPERSEDED = "superseded"  # a rival lineage is ahead: stop and log it
    SELF_HOP = "self_hop"  # this node is the lap's only member left: train the next hop here
    WAIT = "wait"  # no candidate is eligible now: wait a tick and rank again
    PROPOSE = "propose"  # propose the hop to the best-ranked candidate


@dataclass(frozen=True)
class Tries:
    attempt: int = 0
    excluded: Mapping[str, str] = field(default_factory=dict)
    transfer_failures: Mapping[str, int] = field(default_factory=dict)
    waited: float = 0.0


def halt(*, finished: bool, rival_ahead: bool) -> Next | None:
    """Checked first on every round: the job completed or this hop was superseded (`finished`), or a later
    claim of another lineage is known (`rival_ahead`)."""
    if finished:
        return Next.STOP
    if rival_ahead:
        return Next.SUPERSEDED
    return None


def route(choices: Sequence[str], *, lap_remaining: Sequence[str] | None, me: str) -> Next:
    """With the ranking's eligible candidates: propose to the first, else train here when this node is the
    only member the lap still has to visit (`lap_remaining` is None before hop 0), else wait."""
    if choices:
        return Next.PROPOSE
    if lap_remaining is not None and list(lap_remaining) == [me]:
        return Next.SELF_HOP
    return Next.WAIT


def waited(t: Tries, tick: float) -> Tries:
    """One more tick without an eligible candidate; soft exclusions expire every SOFT_EXCLUSION_S."""
    total = t.waited + tick
    if total >= SOFT_EXCLUSION_S:
        return replace(t, excluded={p: r for p, r in t.excluded.items() if r in HARD_EXCLUSIONS}, waited=0.0)
    return replace(t, waited=total)


def proposing(t: Tries, attempt: int) -> Tries:
    """A candidate was chosen and the hop is proposed as `attempt` (unused anywhere for that hop)."""
    return replace(t, attempt=attempt, waited=0.0)


def declined(t: Tries, cand: str, reason: str | None) -> Tries:
    """The candidate declined (`reason`), or did not answer in time (None). A lost Accept, or a `stale`
    decline, may have left a reservation for this attempt behind: the next proposal is a new attempt."""
    attempt = t.attempt + 1 if reason is None or reason == "stale" else t.attempt
    return replace(t, attempt=attempt, excluded={**t.excluded, cand: "timeout" if reason is None else "declined"})


def poison_refused(t: Tries, cand: str, proposal_attempt: int) -> Tries:
    """The receiver's poisoning guard refused the model: route on, as a new attempt."""
    return replace(t, attempt=proposal_attempt + 1, excluded={**t.excluded, cand: "declined"})


def transfer_failed(t: Tries, cand: str, proposal_attempt: int) -> Tries:
    """The bundle did not arrive: re-propose (the transfer resumes) unless it already failed twice there."""
    n = t.transfer_failures.get(cand, 0) + 1
    excluded = {**t.excluded, cand: "transfer"} if n >= TRANSFER_FAILURES_EXCLUDE else dict(t.excluded)
    return replace(t, attempt=proposal_attempt + 1, excluded=excluded,
                   transfer_failures={**t.transfer_failures, cand: n})


def successor_lost(t: Tries, cand: str, proposal_attempt: int) -> Tries:
    """The successor took the hop, then its lease lapsed or it disconnected: retry elsewhere, for good."""
    return replace(t, attempt=proposal_attempt + 1, excluded={**t.excluded, cand: "failed"})
