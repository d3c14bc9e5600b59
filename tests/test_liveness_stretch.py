"""Issue 21: liveness past 16 peers (snakenode/net/liveness.py). Pings cost CPU, so a node pings at most
PING_BUDGET_PER_S peers a second: past that many peers the period between two pings of one peer stretches.
Real libp2p hosts (Noise + Yamux) on 127.0.0.1, one trio run: a centre with 17 peers, every one running
the real Liveness."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.peer.peerinfo import info_from_p2p_addr

from snakenode.counters import Counters
from snakenode.identity import Identity
from snakenode.net import host as host_mod
from snakenode.net import liveness as liveness_mod
from snakenode.net.liveness import Liveness
from snakenode.net.peers import PeerTable

INTERVAL_S = 0.25  # far below 17 / 16 s, so the stretch is what sets the period


async def _node(stack: AsyncExitStack, nurseries: list[trio.Nursery], ident: Identity, max_peers: int
                ) -> tuple[Liveness, Counters, str, str]:
    """A listening host and its Liveness; each in its own nursery on the stack, so they unwind in order."""
    host = host_mod.build_host(ident, max_peers)
    await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
    nursery = await stack.enter_async_context(trio.open_nursery())
    nurseries.append(nursery)
    counters = Counters()
    live = Liveness(host, PeerTable(ident.peer_id, 3, 60.0), counters, INTERVAL_S, 2.0, lambda e, p: None)
    host.get_network().register_notifee(live.notifee())
    await nursery.start(live.run)
    addr = str(host.get_addrs()[0])
    if "/p2p/" not in addr:
        addr += f"/p2p/{ident.peer_id}"
    return live, counters, ident.peer_id, addr


@pytest.mark.timeout(90)
async def test_past_16_peers_the_ping_period_stretches_to_the_budget() -> None:
    n = int(liveness_mod.PING_BUDGET_PER_S) + 1
    nurseries: list[trio.Nursery] = []
    # The lower id of a pair pings: the centre takes the lowest, so it pings all of them and answers none.
    idents = sorted((Identity(Ed25519PrivateKey.generate()) for _ in range(n + 1)), key=lambda i: i.peer_id)
    async with AsyncExitStack() as stack:
        centre, counters, centre_id, centre_addr = await _node(stack, nurseries, idents[0], 32)
        assert centre.period() == INTERVAL_S
        peers = [await _node(stack, nurseries, i, 4) for i in idents[1:]]
        for live, _, _, _ in peers:
            with trio.fail_after(15):
                await live.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(centre_addr)))
        with trio.fail_after(15):
            while centre.period() != n / liveness_mod.PING_BUDGET_PER_S:
                await trio.sleep(0.05)
        assert centre.period() > INTERVAL_S
        # Over a few seconds the centre sends about one ping per peer per stretched period, not one per
        # INTERVAL_S.
        pinged = sum(1 for _, _, pid, _ in peers if centre.pings(pid))
        assert pinged == n
        before, t0 = counters.get("bytes.ping.out"), time.monotonic()
        await trio.sleep(3.0)
        sent = (counters.get("bytes.ping.out") - before) / liveness_mod.PING_LENGTH
        elapsed = time.monotonic() - t0
        budget = pinged * elapsed / centre.period() + pinged  # one more each for the window's edges
        unstretched = pinged * elapsed / INTERVAL_S
        assert sent <= budget < unstretched, (sent, budget, unstretched, pinged)
        assert counters.get("ping.missed") == 0
        for nursery in nurseries:
            nursery.cancel_scope.cancel()
