"""When scripted faults are due. Pure: the runner feeds it the clock and newly seen hop-log records.

A fault fires `at_s` seconds after the first job's submission, or `after_s` seconds after the runner first
sees a hop-log record matching its `on` trigger ("when node3 starts training hop 4" is
`on = {event = "train_start", hop = 4, host = "node3"}`). A fault with `duration_s` schedules its inverse
(continue, heal, link_up, start, or the original bandwidth) that long after it fired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scenarios.spec import INVERSE, Fault, Trigger

# Events a holder writes about its own hop: for these the record's writer must be its holder, so a
# gossiped copy seen by a third node is not mistaken for a second event.
OWN_EVENTS = ("received", "train_start", "trained", "lap_complete", "job_complete")


def matches(trigger: Trigger, rec: Mapping[str, Any], name_of: Mapping[str, str],
            groups: tuple[tuple[str, ...], ...] = ()) -> bool:
    """Whether a hop-log record satisfies an `on` trigger."""
    if trigger.event is None or rec.get("event") != trigger.event:
        return False
    if trigger.event in OWN_EVENTS and rec.get("node") != rec.get("holder"):
        return False
    if trigger.hop is not None and rec.get("hop") != trigger.hop:
        return False
    if trigger.min_hop is not None and int(rec.get("hop", -1)) < trigger.min_hop:
        return False
    if trigger.attempt is not None and rec.get("attempt") != trigger.attempt:
        return False
    holder = name_of.get(str(rec.get("holder")))
    if trigger.host is not None and holder != trigger.host:
        return False
    if trigger.crossing:
        prev = name_of.get(str(rec.get("prev_holder")))
        side = {h: i for i, g in enumerate(groups) for h in g}
        if holder not in side or prev not in side or side[holder] == side[prev]:
            return False
    return True


def resolve_target(fault: Fault, rec: Mapping[str, Any] | None, name_of: Mapping[str, str]) -> str:
    """The host a fault hits: its named target, or the holder / previous holder of the triggering record."""
    if fault.target == "holder" and rec is not None:
        return name_of.get(str(rec.get("holder")), "")
    if fault.target == "prev_holder" and rec is not None:
        return name_of.get(str(rec.get("prev_holder")), "")
    return fault.target


@dataclass
class Pending:
    """A fault waiting to fire. `due` is the runner's monotonic time once known."""

    fault: Fault
    kind: str
    target: str = ""
    due: float | None = None
    record: dict[str, Any] | None = None
    inverse_of: int | None = None  # index of the fault this one undoes
    restore_bandwidth: str = ""

    @property
    def scheduled(self) -> bool:
        return self.inverse_of is None


def initial(faults: tuple[Fault, ...], t0: float) -> list[Pending]:
    """Pending entries for the scripted faults, time-triggered ones with their due time set."""
    out = []
    for f in faults:
        if f.kind == "hook":
            continue  # fired by the node itself; the runner watches its log
        p = Pending(f, f.kind, f.target)
        if f.trigger is not None and f.trigger.at_s is not None:
            p.due = t0 + f.trigger.at_s + f.trigger.after_s
        out.append(p)
    return out


def observe(pending: list[Pending], rec: Mapping[str, Any], seen_at: float, name_of: Mapping[str, str]) -> None:
    """Arm every event-triggered fault that `rec` (seen at `seen_at`) satisfies."""
    for p in pending:
        trig = p.fault.trigger
        if p.due is not None or p.inverse_of is not None or trig is None or trig.event is None:
            continue
        if matches(trig, rec, name_of, p.fault.groups):
            p.due = seen_at + trig.after_s
            p.record = dict(rec)
            p.target = resolve_target(p.fault, rec, name_of)


def take_due(pending: list[Pending], now: float) -> list[Pending]:
    """Remove and return the entries due at `now`, in due order."""
    due = sorted((p for p in pending if p.due is not None and p.due <= now), key=lambda p: p.due or 0.0)
    for p in due:
        pending.remove(p)
    return due


def inverse(p: Pending, fired_at: float, original_bandwidth: str) -> Pending | None:
    """The automatic undo of a fault with `duration_s`, due that long after it fired."""
    f = p.fault
    if f.duration_s is None or f.kind not in INVERSE:
        return None
    return Pending(f, INVERSE[f.kind], p.target, due=fired_at + f.duration_s, inverse_of=f.index,
                   restore_bandwidth=original_bandwidth if f.kind == "throttle" else "")
