"""The node's HTTP side: Prometheus metrics, a read-only JSON API and a live dashboard (docs/OPERATIONS.md).

It is a part of its own: it reads the node only through `Sources` (callables returning the same JSON
documents the control socket serves, the counters, the event-loop lag monitor), so the daemon's inside can
change without touching it. Nothing here imports torch or libp2p; hypercorn and prometheus_client are
imported only when the server starts, so `--http off` costs nothing.
"""

from snakenode.http.address import HttpAddressError, parse_address
from snakenode.http.sources import Sources

__all__ = ["HttpAddressError", "Sources", "parse_address"]
