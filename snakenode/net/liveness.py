"""Liveness: connection events from libp2p plus our own ping loop per connected peer.

libp2p reports a crashed peer (its connection closes, ~0.2 s), but never a frozen or partitioned one:
their TCP connections stay open. So every connected peer gets a long-lived `/ipfs/ping/1.0.0` stream and
a ping every `ping_interval_s`; a ping unanswered within `ping_timeout_s` is a miss, and after
`ping_misses` consecutive misses the peer is declared down and disconnected. Worst-case detection is
interval + misses x timeout (1 + 2 x 1.5 = 4 s with the defaults), inside the 6 s the product promises.
The training worker is niced, so a busy node still answers and sends pings on time.

Pings cost CPU (Noise, Yamux and trio work per round trip, on both sides), so a node spends at most
PING_BUDGET_PER_S pings per second: with more live peers than that, each peer's period stretches to
peers / budget seconds (measured: 33 daemons on 2 cores pinging the full mesh at 1 Hz starve each other,
declare each other down and never converge). Detection then takes period + misses x timeout.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_ID
from libp2p.host.ping import PING_LENGTH
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from snakenode import logs
from snakenode.counters import Counters
from snakenode.net.peers import PeerTable

log = logs.get("liveness")

# A ping that "timed out" after several times its deadline means our own process was suspended
# (SIGSTOP, a laptop lid, a starved event loop): not evidence against the peer.
SUSPENDED_FACTOR = 3.0
PING_BUDGET_PER_S = 16.0


class _Notifee(INotifee):
    """Forwards connection events into a trio channel; libp2p calls these from its own tasks."""

    def __init__(self, send: trio.MemorySendChannel[tuple[str, str]]) -> None:
        self.send = send

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._post("connected", conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._post("disconnected", conn)

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    def _post(self, kind: str, conn: INetConn) -> None:
        try:
            self.send.send_nowait((kind, conn.muxed_conn.peer_id.to_string()))
        except (trio.WouldBlock, trio.ClosedResourceError, AttributeError):
            pass


class Liveness:
    def __init__(self, host: IHost, table: PeerTable, counters: Counters, interval_s: float,
                 timeout_s: float, on_change: Callable[[str, str], None]) -> None:
        self.host = host
        self.table = table
        self.counters = counters
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_change = on_change  # (event, peer_id): "up" | "down"
        self._send, self._recv = trio.open_memory_channel[tuple[str, str]](1024)
        self._pinging: set[str] = set()
        self._nursery: trio.Nursery | None = None

    def period(self) -> float:
        """Seconds between two pings of one peer: the configured interval, stretched past the budget."""
        return max(self.interval_s, len(self._pinging) / PING_BUDGET_PER_S)

    def notifee(self) -> INotifee:
        return _Notifee(self._send)

    def connected_ids(self) -> set[str]:
        try:
            conns = self.host.get_network().get_connections_map()
            return {pid.to_string() for pid, cs in conns.items() if cs}
        except Exception:  # noqa: BLE001 - older API shapes
            return {p.to_string() for p in self.host.get_connected_peers()}

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for kind, pid in self._recv:
                now = time.monotonic()
                if kind == "connected":
                    was_live = self.table.is_live(pid)
                    self.table.on_connected(pid, now)
                    if pid not in self._pinging:
                        self._pinging.add(pid)
                        nursery.start_soon(self._ping_loop, pid)
                    if not was_live:
                        self.on_change("up", pid)
                elif kind == "disconnected":
                    if pid in self.connected_ids():
                        continue  # another connection to the same peer is still up
                    if self.table.on_disconnected(pid, now):
                        log.info("peer_down", peer=pid, reason="disconnected")
                        self.on_change("down", pid)

    async def _ping_loop(self, pid: str) -> None:
        stream: INetStream | None = None
        peer = ID.from_base58(pid)
        try:
            while self.table.get(pid).connected:
                t0 = time.monotonic()
                ok = False
                try:
                    with trio.fail_after(self.timeout_s):
                        if stream is None:
                            stream = await self.host.new_stream(peer, [TProtocol(PING_ID)])
                        payload = secrets.token_bytes(PING_LENGTH)
                        await stream.write(payload)
                        got = b""
                        while len(got) < PING_LENGTH:
                            chunk = await stream.read(PING_LENGTH - len(got))
                            if not chunk:
                                raise EOFError
                            got += chunk
                        ok = got == payload
                except trio.Cancelled:
                    raise
                except BaseException:  # noqa: BLE001 - any failure is a missed ping
                    ok = False
                self.counters.add("bytes.ping.out", PING_LENGTH)
                now = time.monotonic()
                if ok:
                    self.counters.add("bytes.ping.in", PING_LENGTH)
                    self.table.on_ping_ok(pid, (now - t0) * 1000, now)
                else:
                    self.counters.add("ping.missed")
                    if stream is not None:
                        with trio.move_on_after(0.5):
                            try:
                                await stream.reset()
                            except Exception:  # noqa: BLE001
                                pass
                        stream = None
                    if not self.table.get(pid).connected:
                        break
                    if now - t0 > self.timeout_s * SUSPENDED_FACTOR:
                        # Far past the deadline: this process was frozen or starved, not the peer.
                        self.counters.add("ping.self_suspended")
                        continue
                    if self.table.on_ping_miss(pid, now):
                        log.info("peer_down", peer=pid, reason="unresponsive",
                                 misses=self.table.ping_misses)
                        self.counters.add("peer.down.unresponsive")
                        self.on_change("down", pid)
                        with trio.move_on_after(2):
                            try:
                                await self.host.disconnect(peer)
                            except Exception:  # noqa: BLE001
                                pass
                        # A frozen peer may hold the connection open from our side's view; mark it closed.
                        self.table.get(pid).connected = False
                        break
                    continue  # ping again at once: a second miss should not wait a full interval
                await trio.sleep(max(0.0, self.period() - (time.monotonic() - t0)))
        finally:
            self._pinging.discard(pid)
            if stream is not None:
                with trio.move_on_after(0.5, shield=True):
                    try:
                        await stream.close()
                    except Exception:  # noqa: BLE001
                        pass
