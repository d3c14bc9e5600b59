"""What the HTTP side may read of a node: the documents the control socket serves, and nothing to write.

The daemon builds one `Sources` from the same functions its control ops call, so `/api/jobs` and
`snakenode jobs --json` are one document by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]


class UnknownJob(LookupError):
    """`job` raises this (or the control socket's unknown_job error) for a job the node does not know."""


@dataclass(frozen=True)
class Sources:
    status: Callable[[], Doc]                  # `snakenode status --json`
    peers: Callable[[], list[Doc]]             # `snakenode peers --json`
    jobs: Callable[[], list[Doc]]              # `snakenode jobs --json`
    job: Callable[[str, int], Doc]             # control op `job` {job_id, since}: summary, records, total, spec
    progress: Callable[[], dict[str, Doc]]     # in-hop progress by job id (worker events of the running hop)
    counters: Callable[[], dict[str, int]]     # Counters.snapshot()
