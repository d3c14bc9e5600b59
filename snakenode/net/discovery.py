"""Finding peers: bootstrap peers, peer exchange, and (opt-in) mDNS.

A network needs one bootstrap peer. On every connection we open, the two sides swap profiles over
`/snake/peers/1.0.0`; a bootstrap peer (or the first peer, when there is none) is also asked for every
live peer it knows, and we dial those. So a joining node sees the whole network after one round trip,
without waiting for the periodic gossip refresh. Dials back off exponentially with jitter per peer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from snakenode import logs, wire
from snakenode import profile as profile_mod
from snakenode.counters import Counters
from snakenode.net.host import StreamIO, open_stream, register
from snakenode.net.peers import PeerTable

log = logs.get("discovery")

PROTO_PEERS = wire.PROTO_PEERS
MAX_PX_PEERS = 256
DIAL_TIMEOUT_S = 10.0  # a loaded machine needs seconds for a Noise handshake in Python
REEXCHANGE_S = 30.0  # ask the bootstrap peers again for everyone they know (heals partitions)
DIAL_CONCURRENCY = 8
DIAL_TICK_S = 0.25


class Discovery:
    def __init__(self, host: IHost, table: PeerTable, counters: Counters,
                 own_profile: Callable[[], dict[str, Any]],
                 on_profile: Callable[[dict[str, Any]], None],
                 on_connected: Callable[[str], None],
                 bootstrap: list[str], max_peers: int,
                 allowed: Callable[[str], bool]) -> None:
        self.host = host
        self.table = table
        self.counters = counters
        self.own_profile = own_profile
        self.on_profile = on_profile
        self.on_connected = on_connected
        self.max_peers = max_peers
        self.allowed = allowed
        self._dialing: set[str] = set()
        self._wake = trio.Event()
        self._limit = trio.Semaphore(DIAL_CONCURRENCY)
        self.bootstrap_ids: set[str] = set()
        for addr in bootstrap:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            pid = info.peer_id.to_string()
            if pid != table.self_id:
                self.bootstrap_ids.add(pid)
                table.mark_bootstrap(pid, addr)
        register(host, PROTO_PEERS, "peers", self._serve, counters, allowed)

    def wake(self) -> None:
        self._wake.set()

    def hint(self, peer_id: str, addrs: list[str]) -> None:
        """A peer found outside gossip (mDNS, --coordinator): dial it like a bootstrap peer."""
        if peer_id == self.table.self_id:
            return
        for a in addrs:
            self.table.mark_bootstrap(peer_id, a)
        self.wake()

    async def _reexchange(self) -> None:
        """Every REEXCHANGE_S, repeat peer exchange with connected bootstrap peers: a node cut off from part
        of the network (load spike, partition) learns of everyone again and redials them."""
        while True:
            await trio.sleep(REEXCHANGE_S)
            for pid in sorted(self.bootstrap_ids):
                if self.table.get(pid).connected:
                    await self.exchange(pid, want_peers=True)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reexchange)
            task_status.started()
            while True:
                now = time.monotonic()
                for entry in self.table.to_dial(now, self.max_peers):
                    if entry.peer_id in self._dialing:
                        continue
                    self._dialing.add(entry.peer_id)
                    nursery.start_soon(self._dial, entry.peer_id, list(entry.addrs))
                self._wake = trio.Event()
                with trio.move_on_after(DIAL_TICK_S):
                    await self._wake.wait()

    async def _dial(self, pid: str, addrs: list[str]) -> None:
        try:
            async with self._limit:
                maddrs = []
                for a in addrs:
                    base = a.split("/p2p/")[0]
                    try:
                        maddrs.append(multiaddr.Multiaddr(base))
                    except Exception:  # noqa: BLE001 - skip unparsable advertised addresses
                        continue
                if not maddrs:
                    self.table.on_dial_failed(pid, time.monotonic())
                    return
                peer = ID.from_base58(pid)
                # We run our own per-peer backoff. libp2p's negative dial cache (60 s) and the stale
                # addresses it keeps in the peerstore would otherwise stop us from reaching a peer that
                # restarted on a new port until the cache expires.
                network = self.host.get_network()
                if hasattr(network, "unblock_peer"):
                    network.unblock_peer(peer)
                if not self.table.get(pid).connected:
                    self.host.get_peerstore().clear_addrs(peer)
                try:
                    with trio.fail_after(DIAL_TIMEOUT_S):
                        await self.host.connect(PeerInfo(peer, maddrs))
                except trio.Cancelled:
                    raise
                except BaseException as exc:  # noqa: BLE001 - every failure means: back off, retry later
                    delay = self.table.on_dial_failed(pid, time.monotonic())
                    self.counters.add("dial.failed")
                    log.debug("dial_failed", peer=pid, retry_in_s=round(delay, 2), error=f"{type(exc).__name__}: {exc}"[:300])
                    return
                self.counters.add("dial.ok")
                self.on_connected(pid)
                await self.exchange(pid, want_peers=pid in self.bootstrap_ids or not self.bootstrap_ids)
        finally:
            self._dialing.discard(pid)

    async def exchange(self, pid: str, want_peers: bool) -> None:
        """Swap profiles with a peer we just connected to; optionally learn its live peers."""
        try:
            io = await open_stream(self.host, pid, PROTO_PEERS, self.counters, "peers")
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, trio.Cancelled):
                raise
            self.counters.add("error.px.open")
            return
        try:
            await io.write_frame({"t": "px_req", "want_peers": want_peers, "profile": self.own_profile()})
            kind, f = await io.read_frame(limit=MAX_PX_PEERS * 4096)
            if kind != "px":
                raise wire.WireError(f"expected px, got {kind}")
            self._learn(f.raw("profile"))
            peers = f.raw("peers", required=False, default=[])
            if not isinstance(peers, list) or len(peers) > MAX_PX_PEERS:
                raise wire.WireError("px.peers must be a list of at most 256 profiles")
            for p in peers:
                self._learn(p)
            self.wake()
        except wire.WireError as exc:
            self.counters.add(f"reject.peers.{exc.kind}")
            log.warning("px_rejected", peer=pid, error=str(exc)[:200])
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, trio.Cancelled):
                raise
            self.counters.add("error.px.exchange")
            log.debug("px_failed", peer=pid, error=type(exc).__name__)
        finally:
            await io.close()

    def _learn(self, obj: Any) -> None:
        try:
            prof = profile_mod.decode(obj)
        except wire.WireError as exc:
            self.counters.add(f"reject.peers.{exc.kind}")
            return
        if not self.allowed(prof["peer_id"]):
            self.counters.add("reject.peers.peer_not_allowed")
            return
        self.on_profile(prof)

    async def _serve(self, io: StreamIO) -> None:
        kind, f = await io.read_frame(limit=64 * 1024)
        if kind != "px_req":
            raise wire.WireError(f"expected px_req, got {kind!r}", "unexpected")
        want = f.bool("want_peers", required=False)
        self._learn(f.raw("profile"))
        peers: list[dict[str, Any]] = []
        if want:
            for e in self.table.live():
                if e.profile is not None and e.peer_id != io.peer:
                    peers.append(e.profile)
                if len(peers) >= MAX_PX_PEERS:
                    break
        await io.write_frame({"t": "px", "profile": self.own_profile(), "peers": peers})
        self.wake()


def start_mdns_listener(discovery: Discovery) -> Callable[[], None]:
    """Feed mDNS discoveries into the dialer; returns an unregister function."""
    from libp2p.discovery.events.peerDiscovery import peerDiscovery

    def handler(info: PeerInfo) -> None:
        pid = info.peer_id.to_string()
        addrs = [f"{a}/p2p/{pid}" for a in info.addrs]
        discovery.hint(pid, addrs)

    peerDiscovery.register_peer_discovered_handler(handler)
    return lambda: peerDiscovery.unregister_peer_discovered_handler(handler)
