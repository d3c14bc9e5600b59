"""Who gives orders for a job: P2P (each holder decides where the snake goes next) or CS (a coordinator
peer assigns every hop and keeps the baton; snake/coordinator.py). The holder, the hand-off and the
receiver ask a job's mode policy instead of testing the mode themselves.

Pure except for the `live` callable (is a peer in the live peer table), which a CS job with
`fallback = "p2p"` consults: once its coordinator is gone, the job carries on in P2P mode for good
(`JobRun.fallback`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from snakenode.snake.state import JobState


class ModePolicy(Protocol):
    name: str

    def lease_target(self, run: Any, state: JobState) -> str | None:
        """Whom the holder of `state` renews its baton lease with."""
        ...

    def may_assign(self, run: Any, peer: str) -> str | None:
        """None when `peer` may give this node a hop of `run`, else why not."""
        ...

    def hands_back(self, run: Any) -> bool:
        """A trained hop goes back to the coordinator (uploaded) instead of on to a successor."""
        ...

    def assigns(self, run: Any) -> bool:
        """This node hands hops out as `assign` on /snake/cs/1.0.0 (it coordinates the job)."""
        ...

    def releases_predecessor(self, run: Any) -> bool:
        """A holder that handed on (or completed) tells its predecessor to drop the baton."""
        ...


class P2PMode:
    name = "p2p"

    def lease_target(self, run: Any, state: JobState) -> str | None:
        return state.prev_holder

    def may_assign(self, run: Any, peer: str) -> str | None:
        return None

    def hands_back(self, run: Any) -> bool:
        return False

    def assigns(self, run: Any) -> bool:
        return False

    def releases_predecessor(self, run: Any) -> bool:
        return True


class CSMode:
    """A CS job seen from this node: its coordinator (`me` == spec.coordinator) or one of its nodes."""

    name = "cs"

    def __init__(self, me: str, live: Callable[[str], bool]) -> None:
        self.me = me
        self.live = live

    def coordinates(self, run: Any) -> bool:
        return run.spec.get("coordinator") == self.me

    def lease_target(self, run: Any, state: JobState) -> str | None:
        return state.prev_holder if run.fallback else run.spec["coordinator"]

    def may_assign(self, run: Any, peer: str) -> str | None:
        if peer == run.spec["coordinator"]:
            return None
        if run.spec.get("fallback") == "p2p" and not self.live(run.spec["coordinator"]):
            run.fallback = True  # the coordinator is gone and the job allows P2P: follow the holders
            return None
        return (f"job {run.job_id} runs in CS mode: only its coordinator {run.spec['coordinator']} assigns hops "
                f"(fallback {run.spec.get('fallback')})")

    def hands_back(self, run: Any) -> bool:
        return not run.fallback

    def assigns(self, run: Any) -> bool:
        return self.coordinates(run) and not run.fallback

    def releases_predecessor(self, run: Any) -> bool:
        return not self.coordinates(run)


class Modes:
    """The policy for each job of this node."""

    def __init__(self, me: str, live: Callable[[str], bool]) -> None:
        self.p2p = P2PMode()
        self.cs = CSMode(me, live)

    def of(self, run: Any) -> ModePolicy:
        return self.cs if run.spec["mode"] == "cs" else self.p2p

    def coordinates(self, run: Any) -> bool:
        return run.spec["mode"] == "cs" and self.cs.coordinates(run)
