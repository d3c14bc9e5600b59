"""Event-loop lag: how late a trio task's sleeps wake up.

Every protocol deadline of the node (pings, leases, negotiation timeouts) assumes the loop answers
promptly; a blocking call in the daemon shows here first. The monitor sleeps `interval` seconds at a time
and records how much later than asked it woke. Samples go to an optional observer (the Prometheus
histogram) and to a bounded window for percentiles (`/api/lag`, benchmarks/loop_lag.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

INTERVAL_S = 0.05
WINDOW = 1200  # one minute of samples at the default interval


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class LagMonitor:
    def __init__(self, interval: float = INTERVAL_S, window: int = WINDOW) -> None:
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=window)
        self.observers: list[Callable[[float], None]] = []
        self.count = 0
        self.max_s = 0.0

    def record(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.samples.append(lag)
        self.count += 1
        self.max_s = max(self.max_s, lag)
        for observe in self.observers:
            observe(lag)

    def summary(self) -> dict[str, float | int | None]:
        recent = list(self.samples)
        return {"interval_s": self.interval, "samples": len(recent), "total_samples": self.count,
                "p50_s": percentile(recent, 50), "p99_s": percentile(recent, 99),
                "max_s": max(recent) if recent else None, "max_ever_s": self.max_s}

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            asked = trio.current_time() + self.interval
            await trio.sleep(self.interval)
            self.record(trio.current_time() - asked)
