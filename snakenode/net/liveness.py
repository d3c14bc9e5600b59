"""Liveness: connection events from libp2p plus our own ping protocol per connected peer.

libp2p reports a crashed peer (its connection closes, ~0.2 s), but never a frozen or partitioned one:
their TCP connections stay open. So every connected pair runs the standard `/ipfs/ping/1.0.0` on a
long-lived stream: the peer with the lower peer id pings every period, the other answers. A ping not
answered within `ping_timeout_s` is a miss, and after `ping_misses` consecutive misses the pinger
declares the peer down and disconnects it; the answering side watches the pings arrive and declares the
pinger down when none came for `1.5 x period + misses x timeout`. One pinger per pair halves the traffic of
pinging both ways (measured idle traffic mattered in the Flower comparison) and keeps detection within
period + misses x timeout = 4 s (pinger) and 4.5 s (answerer) with the defaults (a frozen peer must
leave every table within 6 s, also on a loaded machine: the half period is the answerer's slack).

The ping payload is 32 bytes (the standard); we fill its last 8 with the pinger's last round-trip time in
microseconds, so both sides know the link's latency (routing uses it). Any 32-byte payload is echoed.

Pings cost CPU (Noise, Yamux and trio work per round trip), so a node pings at most PING_BUDGET_PER_S
peers per second: past that, each peer's period stretches to peers / budget seconds (measured: 33 daemons
on 2 cores pinging the full mesh at 1 Hz starved each other and never converged).
The training worker is niced, so a busy node still answers and sends pings on time; a process that was
itself suspended (SIGSTOP, a starved loop) does not blame its peers for the pings it missed.
"""

from __future__ import annotations

import secrets
import struct
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
WATCH_TICK_S = 0.25
RTT = struct.Struct(">Q")


async def _read_ping(stream: INetStream) -> bytes | None:
    """One whole ping payload, or None when the stream ended first."""
    got = b""
    while len(got) < PING_LENGTH:
        chunk = await stream.read(PING_LENGTH - len(got))
        if not chunk:
            return None
        got += chunk
    return got


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
                 timeout_s: float, on_change: Callable[[str, str], None],
                 allowed: Callable[[str], bool] | None = None) -> None:
        self.host = host
        self.allowed = allowed  # closed network: any other peer's connection, inbound too, is dropped
        self.table = table
        self.counters = counters
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_change = on_change  # (event, peer_id): "up" | "down"
        self.self_id = table.self_id
        self._send, self._recv = trio.open_memory_channel[tuple[str, str]](1024)
        self._watching: set[str] = set()
        self._last_ping: dict[str, float] = {}  # answering side: when the peer's last ping arrived
        self._nursery: trio.Nursery | None = None
        host.set_stream_handler(TProtocol(PING_ID), self._serve_ping)  # not host.register: see _serve_ping

    def period(self) -> float:
        """Seconds between two pings of one peer: the configured interval, stretched past the budget."""
        return max(self.interval_s, len(self._watching) / PING_BUDGET_PER_S)

    def pings(self, pid: str) -> bool:
        """The lower peer id of a pair pings; the other answers and watches."""
        return self.self_id < pid

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
                if kind == "connected" and self.allowed is not None and not self.allowed(pid):
                    self.counters.add("reject.connection.peer_not_allowed")
                    log.warning("rejected", proto="connection", peer=pid, reason="peer_not_allowed")
                    nursery.start_soon(self._drop, pid)
                    continue
                if kind == "connected":
                    was_live = self.table.is_live(pid)
                    self.table.on_connected(pid, now)
                    if pid not in self._watching:
                        self._watching.add(pid)
                        self._last_ping[pid] = now
                        nursery.start_soon(self._ping_loop if self.pings(pid) else self._watch_loop, pid)
                    if not was_live:
                        self.on_change("up", pid)
                elif kind == "disconnected":
                    if pid in self.connected_ids():
                        continue  # another connection to the same peer is still up
                    if self.table.on_disconnected(pid, now):
                        log.info("peer_down", peer=pid, reason="disconnected")
                        self.on_change("down", pid)

    async def _drop(self, pid: str) -> None:
        with trio.move_on_after(2):
            try:
                await self.host.disconnect(ID.from_base58(pid))
            except Exception:  # noqa: BLE001 - already gone
                pass

    async def _declare_down(self, pid: str) -> None:
        log.info("peer_down", peer=pid, reason="unresponsive", misses=self.table.ping_misses)
        self.counters.add("peer.down.unresponsive")
        self.on_change("down", pid)
        with trio.move_on_after(2):
            try:
                await self.host.disconnect(ID.from_base58(pid))
            except Exception:  # noqa: BLE001
                pass

    # --- the pinging side ---------------------------------------------------------------------------
    async def _ping_loop(self, pid: str) -> None:
        stream: INetStream | None = None
        peer = ID.from_base58(pid)
        last_rtt_us = 0
        try:
            while self.table.get(pid).connected:
                t0 = time.monotonic()
                ok = False
                try:
                    with trio.fail_after(self.timeout_s):
                        if stream is None:
                            stream = await self.host.new_stream(peer, [TProtocol(PING_ID)])
                        payload = secrets.token_bytes(PING_LENGTH - RTT.size) + RTT.pack(last_rtt_us)
                        await stream.write(payload)
                        got = await _read_ping(stream)
                        if got is None:
                            raise EOFError
                        ok = got == payload
                except trio.Cancelled:
                    raise
                except BaseException:  # noqa: BLE001 - any failure is a missed ping
                    ok = False
                self.counters.add("bytes.ping.out", PING_LENGTH)
                now = time.monotonic()
                if ok:
                    self.counters.add("bytes.ping.in", PING_LENGTH)
                    last_rtt_us = min(int((now - t0) * 1e6), 2**63 - 1)
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
                        self.counters.add("ping.self_suspended")
                        continue
                    if self.table.on_ping_miss(pid, now):
                        await self._declare_down(pid)
                        break
                    continue  # ping again at once: a second miss should not wait a full period
                await trio.sleep(max(0.0, self.period() - (time.monotonic() - t0)))
        finally:
            self._watching.discard(pid)
            if stream is not None:
                with trio.move_on_after(0.5, shield=True):
                    try:
                        await stream.close()
                    except Exception:  # noqa: BLE001
                        pass

    # --- the answering side ---------------------------------------------------------------------------
    async def _serve_ping(self, stream: INetStream) -> None:
        """Echo pings (any peer, any payload) and note when they arrive; never raises into libp2p.

        The one stream handler registered without host.register's wrapper and allowlist, on purpose: this is
        libp2p's standard `/ipfs/ping/1.0.0`, whose peers expect raw 32-byte echoes on a long-lived stream,
        so the wrapper's `error` frames would be garbage to them; it contains its own failures (above and
        below); and an unlisted peer is already dropped at connection level (`run`), while an echo of 32
        bytes it sent tells it nothing."""
        try:
            pid = stream.muxed_conn.peer_id.to_string()
        except Exception:  # noqa: BLE001
            pid = ""
        try:
            while True:
                # A pinger pings every period; a stream idle far longer than that is abandoned.
                with trio.fail_after(max(30.0, 10 * self.period())):
                    got = await _read_ping(stream)
                if got is None:
                    return
                await stream.write(got)
                now = time.monotonic()
                self.counters.add("bytes.ping.in", PING_LENGTH)
                self.counters.add("bytes.ping.out", PING_LENGTH)
                if pid:
                    self._last_ping[pid] = now
                    (rtt_us,) = RTT.unpack(got[-RTT.size:])
                    if 0 < rtt_us < 60_000_000:
                        self.table.on_ping_ok(pid, rtt_us / 1000, now)
                    else:
                        self.table.get(pid).last_seen = now
        except trio.Cancelled:
            raise
        except BaseException:  # noqa: BLE001 - a broken ping stream just ends
            self.counters.add("ping.stream_error")
        finally:
            with trio.move_on_after(0.5, shield=True):
                try:
                    await stream.reset()
                except Exception:  # noqa: BLE001
                    pass

    async def _watch_loop(self, pid: str) -> None:
        """Declare a pinging peer down when its pings stop arriving (it froze or the link went)."""
        try:
            last_tick = time.monotonic()
            while self.table.get(pid).connected:
                await trio.sleep(WATCH_TICK_S)
                now = time.monotonic()
                if now - last_tick > self.timeout_s * SUSPENDED_FACTOR:
                    # We were suspended ourselves: give the peer a fresh chance.
                    self.counters.add("ping.self_suspended")
                    self._last_ping[pid] = now
                last_tick = now
                limit = 1.5 * self.period() + self.table.ping_misses * self.timeout_s
                if now - self._last_ping.get(pid, now) > limit:
                    entry = self.table.get(pid)
                    if entry.connected and not entry.down:
                        self.counters.add("ping.missed")
                        entry.misses = self.table.ping_misses - 1
                        if self.table.on_ping_miss(pid, now):
                            await self._declare_down(pid)
                    break
        finally:
            self._watching.discard(pid)
            self._last_ping.pop(pid, None)
