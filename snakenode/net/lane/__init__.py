"""The fast bulk lane: bundle bytes over a separate TCP connection secured with TLS 1.3.

Why: py-libp2p's Noise+Yamux stream is CPU-bound at ~80 MB/s and ~1 CPU-second per 100 MB on each side
(docs/DESIGN.md, "py-libp2p 0.8.1"; benchmarks/transfer.py measures both paths). Python's `ssl` keeps every
per-record step (AES-GCM, framing) in OpenSSL, so a blocking socket driven from a worker thread moves bundle
bytes at close to plain-TCP speed.

Who-is-who does not change: the lane is set up only through the already-authenticated negotiate exchange.
The sender puts a fresh self-signed certificate into its Propose; the receiver's Accept carries a fresh
certificate of its own, a lane id (sent as TLS SNI) and a one-time 32-byte token. Each side then accepts
exactly the other's certificate on the lane (mutual TLS pinned to certificates learnt over Noise), and the
receiver binds the connection to the peer id the negotiation ran with. Everything after the `lane_ok` reply
is byte-for-byte the `/snake/bundle/1.0.0` exchange (net/transfer.py's manifest frame, raw layer bytes,
ack), and the receiver feeds the layer bytes to the same layer sink as the libp2p path
(snakenode/layers/sink.py), so partial files, per-layer checks, resume and the minimum rate are the same.

One module per concern:
    offer.py    per-transfer certificates and the offer codec (all the negotiation needs; no sockets)
    tls.py      the pinned TLS 1.3 contexts
    conn.py     a connection's blocking I/O from worker threads, the lane's errors
    receive.py  LaneIO (the bundle handler's stream interface) and the layer receive loop
    server.py   LaneServer: offers, handshake, hello, serving the bundle handler
    client.py   send_over_lane: dial, handshake, send, fall back to libp2p

The offer codec is imported here eagerly; the rest loads on first use (`lane.LaneServer`, ...), so a module
that needs only the codec (snakenode/snake/messages.py) pulls in neither the lane's sockets nor libp2p.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from snakenode.net.lane.offer import (
    LANE_ID_PREFIX,
    LANE_VERSION,
    MAX_CERT_BYTES,
    LaneCert,
    LaneOffer,
    check_cert,
    decode_propose_field,
    fingerprint,
    propose_field,
)

if TYPE_CHECKING:
    from snakenode.net.lane.client import CONNECT_TIMEOUT_S, remote_host, send_over_lane
    from snakenode.net.lane.conn import LaneError, LaneUnavailable
    from snakenode.net.lane.receive import LaneIO, receive_layers
    from snakenode.net.lane.server import LaneHandler, LaneServer
    from snakenode.net.lane.tls import HANDSHAKE_TIMEOUT_S

_LAZY = {
    "CONNECT_TIMEOUT_S": "client", "remote_host": "client", "send_over_lane": "client",
    "LaneError": "conn", "LaneUnavailable": "conn",
    "LaneIO": "receive", "receive_layers": "receive",
    "LaneHandler": "server", "LaneServer": "server",
    "HANDSHAKE_TIMEOUT_S": "tls",
}

__all__ = ["CONNECT_TIMEOUT_S", "HANDSHAKE_TIMEOUT_S", "LANE_ID_PREFIX", "LANE_VERSION", "MAX_CERT_BYTES", "LaneCert",
           "LaneError", "LaneHandler", "LaneIO", "LaneOffer", "LaneServer", "LaneUnavailable", "check_cert",
           "decode_propose_field", "fingerprint", "propose_field", "receive_layers", "remote_host", "send_over_lane"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
