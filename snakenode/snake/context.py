"""What every part of the node's snake shares, built once by the daemon and passed down (nothing under
snake/ imports the daemon): the settings, the identity, the network service, the layer store, the worker
port, the test fault hooks, the lane server once it listens, the node's task group, and the node's one
hop slot (what it holds or has reserved: a node takes one hop at a time).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from snakenode.config import NodeConfig
from snakenode.counters import Counters
from snakenode.faults import Faults
from snakenode.identity import Identity
from snakenode.layers.store import LayerStore
from snakenode.net.lane.server import LaneServer
from snakenode.net.service import NetService
from snakenode.snake.phases import NodeState
from snakenode.snake.runtime import JobRun
from snakenode.snake.state import Claim, JobState

RESERVATION_S = 30.0  # an Accept holds the node for this long while the bundle arrives


class WorkerPort(Protocol):
    """The torch worker as the daemon offers it (train/client.py behind a lock; started when first used)."""

    async def call(self, op: str, args: dict[str, Any], on_event: Callable[[str, dict[str, Any]], None] | None = None
                   ) -> Any: ...

    async def cancel(self) -> None: ...


class Tasks:
    """The node's long-lived task group: open while the snake runs (Snake.run binds it)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("the snake is not running yet: start background work from Snake.run onwards")
        self._nursery.start_soon(fn, *args)

    def start_if_running(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start `fn` when the node runs; before that (loading, tests) the work is simply not needed."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True


class Reservation:
    """An Accept this node gave: it holds the node for RESERVATION_S while the bundle arrives."""

    def __init__(self, run: JobRun, state: JobState, proposer: str) -> None:
        self.run = run
        self.state = state
        self.proposer = proposer
        self.expires = time.monotonic() + RESERVATION_S
        self.lane_id: str | None = None  # the lane offer made in the Accept, if any

    @property
    def claim(self) -> Claim:
        return self.state.claim


@dataclass
class Slot:
    """The node's one hop slot: the job whose hop it holds, and the proposal it reserved itself for."""

    active: str | None = None
    reservation: Reservation | None = None


@dataclass
class NodeContext:
    cfg: NodeConfig
    ident: Identity
    svc: NetService
    worker: WorkerPort
    faults: Faults
    data_spec: Any = None  # train.data.DataSpec when the node has local data
    lane: LaneServer | None = None  # set once the lane listens
    tasks: Tasks = field(default_factory=Tasks)
    slot: Slot = field(default_factory=Slot)
    store: LayerStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = LayerStore(self.cfg.home / "store")

    @property
    def me(self) -> str:
        return self.svc.peer_id

    @property
    def counters(self) -> Counters:
        return self.svc.counters

    @property
    def jobs_dir(self) -> Path:
        return self.cfg.home / "jobs"

    def lane_threshold(self) -> int:
        return int(self.cfg.lane_min_mb * 2**20)

    def set_idle(self) -> None:
        """Advertise `idle` once the node neither holds nor reserved a hop."""
        if self.slot.active is None and self.slot.reservation is None:
            self.svc.set_state(NodeState.IDLE)

    def cancel_lane(self, r: Reservation | None) -> None:
        """Forget a reservation's lane offer (replaced, expired, or the bundle came over libp2p)."""
        if r is not None and r.lane_id is not None and self.lane is not None:
            self.lane.cancel(r.lane_id)
            r.lane_id = None
