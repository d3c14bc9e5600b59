"""Issue 21: the lane server's two caps (snakenode/net/lane/server.py), on a real listener: at most
MAX_PENDING outstanding offers (the oldest dropped beyond that) and at most `max_connections` connections
in flight (handshakes included; one more is closed at once), so neither a flood of proposals nor of TCP
connections grows without bound."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from snakenode.counters import Counters
from snakenode.net import lane
from snakenode.net.lane import server as lane_server

PEER = "12D3KooWTestSenderPeerIdxxxxxxxxxxxxxxxxxxxxxxxxxx"


async def _handler(io: Any) -> None:
    return None


@pytest.mark.timeout(30)
async def test_offers_beyond_the_cap_drop_the_oldest() -> None:
    counters = Counters()
    cert = lane.LaneCert.generate()
    async with trio.open_nursery() as nursery:
        srv = lane.LaneServer(counters, host="127.0.0.1")
        await nursery.start(srv.serve)
        offers = [srv.expect(PEER, cert.der, _handler) for _ in range(lane_server.MAX_PENDING + 3)]
        assert srv.pending == lane_server.MAX_PENDING == 64
        assert counters.get("lane.offer.dropped") == 3
        assert len({o.lane_id for o in offers}) == len(offers)
        # Cancelling a dropped (oldest) offer changes nothing; cancelling a live one frees its place.
        srv.cancel(offers[0].lane_id)
        assert srv.pending == 64
        srv.cancel(offers[-1].lane_id)
        assert srv.pending == 63
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    counters = Counters()
    async with trio.open_nursery() as nursery:
        srv = lane.LaneServer(counters, host="127.0.0.1", handshake_timeout=20.0)
        assert srv.max_connections == lane_server.MAX_CONNECTIONS == 8
        port = await nursery.start(srv.serve)
        # Eight connections that never finish their handshake hold every place...
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        # ...so the ninth is refused and closed, long before the 20 s handshake timeout.
        with trio.fail_after(5):
            assert await extra.receive_some(1024) == b""
        assert counters.get("reject.lane.busy") == 1
        # The eight are still open (not refused): none has been answered or closed.
        with trio.move_on_after(0.2) as idle:
            await held[0].receive_some(1024)
        assert idle.cancelled_caught
        for s in [*held, extra]:
            await s.aclose()
        nursery.cancel_scope.cancel()
