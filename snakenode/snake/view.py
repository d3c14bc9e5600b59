"""The node's view of the network for one job: who is a member, who can be proposed to, who has been down
for how long, the members' combined label histogram, and what window fits this node. Reads the peer
table and profiles; decides nothing (routing.py and window.py do).
"""

from __future__ import annotations

import time
from typing import Any

from snakenode.snake import routing
from snakenode.snake.context import NodeContext
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import JobState
from snakenode.snake.window import size_window


class NetworkView:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.svc = ctx.svc
        self.down_since: dict[str, float] = {}

    def on_peer_event(self, event: str, pid: str) -> None:
        if event == "down":
            self.down_since.setdefault(pid, time.monotonic())
        else:
            self.down_since.pop(pid, None)

    def members(self, run: JobRun) -> set[str]:
        """Joined, alive nodes (this one included when it joined): the next lap's members."""
        out = {e.peer_id for e in self.svc.table.live()
               if e.profile and run.job_id in (e.profile.get("jobs") or [])}
        if run.joined and run.ready.is_set():
            out.add(self.ctx.me)
        return out

    def preparing(self, run: JobRun) -> list[str]:
        """Live peers still building the job's model (torch start-up)."""
        return [e.peer_id for e in self.svc.table.live()
                if e.profile and run.job_id in (e.profile.get("preparing") or [])]

    def candidates(self) -> list[routing.Candidate]:
        """Every known peer for routing. Profile states are advisory (they are refreshed lazily to keep
        gossip small), so candidates count as idle here; a busy one answers Decline(busy)."""
        now = time.monotonic()
        idle = {"kind": "idle", "job": None, "hop": None}
        out = [routing.Candidate(self.ctx.me, {**self.svc.profile(), "state": idle}, True, 0.0, 0.0)]
        for e in self.svc.table.entries.values():
            if e.profile is None or e.peer_id == self.ctx.me:
                continue
            out.append(routing.Candidate(e.peer_id, {**e.profile, "state": idle}, e.live,
                                         max(0.0, now - e.last_seen), e.rtt_ms))
        return out

    def down_for(self, state: JobState) -> dict[str, float]:
        """How long each lap member that is not live has been down."""
        now = time.monotonic()
        live = self.svc.table.live_ids() | {self.ctx.me}
        out = {}
        for pid in state.lap_members:
            if pid not in live:
                out[pid] = now - self.down_since.setdefault(pid, now)
        return out

    @staticmethod
    def min_memory(run: JobRun) -> float:
        cap = run.capacity
        if not cap:
            return 0.0
        try:
            return float(cap["fixed_mb"]) + min(float(b["train_mb"]) for b in cap["blocks"])
        except (KeyError, ValueError, TypeError):
            return 0.0

    def rank(self, run: JobRun, base: JobState, excluded: dict[str, str]) -> routing.Ranking:
        return routing.rank(run.spec["routing"], base, self.ctx.me, self.candidates(), excluded=excluded,
                            min_memory_mb=self.min_memory(run))

    def reference_hist(self, run: JobRun) -> list[float] | None:
        """The label histogram of every member's data combined (kd.reference = "union")."""
        if run.spec["kd"]["reference"] != "union":
            return None
        total: list[float] = []
        mine = self.svc.profile()
        profiles = [mine] + [e.profile for e in self.svc.table.live() if e.profile]
        for p in profiles:
            if run.job_id not in (p.get("jobs") or []) and p is not mine:
                continue
            hist = ((p.get("data") or {}).get("label_hist")) or []
            total = [a + b for a, b in zip(total + [0] * (len(hist) - len(total)),
                                           hist + [0] * (len(total) - len(hist)), strict=True)]
        return total or None

    def lane_hosts(self, peer: str, via: str | None) -> list[str]:
        """Where to dial a peer's lane: the address of the connection we negotiated on, else its profile's IPs."""
        if via:
            return [via]
        e = self.svc.table.entries.get(peer)
        addrs = [*((e.profile or {}).get("addrs", []) if e is not None else []), *(e.addrs if e else [])]
        return list(dict.fromkeys(a.split("/")[2] for a in addrs if a.split("/")[1:2] in (["ip4"], ["ip6"])))

    def window_size(self, run: JobRun, prev: Any) -> int | None:
        """The largest window (in blocks) this node can train in the job's hop time, None when none fits."""
        w = run.spec["window"]
        lo, hi = int(w["min_blocks"]), int(w["max_blocks"])
        cap = run.capacity
        if not cap:
            return min(hi, run.blocks)
        sizing = size_window(cap, prev, run.blocks, float(self.ctx.cfg.memory_mb), float(w["hop_time_s"]), lo, hi,
                             train_stem=bool(w["train_stem"]), train_head=bool(w["train_head"]),
                             epochs=int(run.spec["train"]["epochs"]),
                             max_steps=int(run.spec["train"]["max_steps"]))
        return sizing.size if sizing.size else None
