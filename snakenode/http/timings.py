"""Hand-off phase durations and hop outcomes from this node's own hop-log records (pure, no I/O).

The hop log already stamps every step of a hop (docs/hoplog-schema.md), so the histograms need no timers
in the protocol code: `Timings.feed` reads new records as they appear and yields each observation once.

Phases, all measured by the node that performs them:
  decide     its `trained` (t_train_end) -> its first `proposed` for the next hop (ranking, capacity checks)
  negotiate  `proposed` -> `accepted` for the same candidate (Propose -> Accept round trip)
  transfer   `accepted` -> `committed` (bundle sent, successor verified every hash)
  load       on the successor: `received` (t_recv) -> `train_start` (bundle checks and guard before training)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

PHASES = ("decide", "negotiate", "transfer", "load")
OUTCOMES = {"committed": "committed", "declined": "declined", "retry": "retry", "superseded": "superseded"}
MAX_PENDING = 4096  # per job: stamps waiting for their other end (a stuck hop must not grow memory)

Observation = tuple[str, str, float]  # (metric: phase|train|outcome, label, seconds or 1)


class Timings:
    def __init__(self, node: str) -> None:
        self.node = node
        self.trained_end: dict[str, float] = {}       # lineage of a trained hop -> t_train_end
        self.proposed: dict[str, float] = {}          # lineage of a proposed state -> t of the proposal
        self.decided: set[str] = set()                # parent lineages whose decide time was observed
        self.accepted: dict[str, float] = {}
        self.received: dict[str, float] = {}

    def _trim(self) -> None:
        for d in (self.trained_end, self.proposed, self.accepted, self.received):
            while len(d) > MAX_PENDING:
                d.pop(next(iter(d)))
        if len(self.decided) > MAX_PENDING:
            self.decided.clear()

    def feed(self, records: Iterable[dict[str, Any]]) -> Iterator[Observation]:
        for r in records:
            if r.get("node") != self.node:
                continue
            ev, lin, t = r.get("event"), r.get("lineage"), r.get("t")
            if not isinstance(lin, str) or not isinstance(t, int | float):
                continue
            if ev in OUTCOMES:
                yield ("outcome", OUTCOMES[ev], 1.0)
            if ev == "trained":
                start, end = r.get("t_train_start"), r.get("t_train_end")
                if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
                    yield ("train", "", end - start)
                    self.trained_end[lin] = end
            elif ev == "proposed":
                self.proposed.setdefault(lin, t)
                parent = r.get("parent_lineage")
                if parent in self.trained_end and parent not in self.decided:
                    self.decided.add(parent)
                    yield ("phase", "decide", max(0.0, t - self.trained_end.pop(parent)))
            elif ev == "accepted" and lin in self.proposed:
                self.accepted[lin] = t
                yield ("phase", "negotiate", max(0.0, t - self.proposed.pop(lin)))
            elif ev == "committed" and lin in self.accepted:
                yield ("phase", "transfer", max(0.0, t - self.accepted.pop(lin)))
            elif ev == "received":
                t_recv = r.get("t_recv")
                self.received[lin] = t_recv if isinstance(t_recv, int | float) else t
            elif ev == "train_start" and lin in self.received:
                start = r.get("t_train_start")
                start = start if isinstance(start, int | float) else t
                yield ("phase", "load", max(0.0, start - self.received.pop(lin)))
        self._trim()
