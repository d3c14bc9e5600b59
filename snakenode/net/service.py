"""The network side of any snakenode peer: host, liveness, gossip, discovery, control socket, node.json.

The bootstrap peer is exactly this service; the training daemon is this service plus data, a worker and
the snake protocol (snakenode.daemon). Keeping it torch- and train-free lets a bootstrap peer start in
about a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from snakenode import __version__, logs, wire
from snakenode import home as home_mod
from snakenode import profile as profile_mod
from snakenode.config import NodeConfig
from snakenode.control import ControlServer
from snakenode.counters import Counters
from snakenode.identity import Identity
from snakenode.net import host as host_mod
from snakenode.net.discovery import Discovery, start_mdns_listener
from snakenode.net.gossip import Gossip
from snakenode.net.liveness import Liveness
from snakenode.net.peers import PeerTable

log = logs.get("node")

EXPIRE_TICK_S = 5.0


class NetService:
    def __init__(self, cfg: NodeConfig, ident: Identity) -> None:
        self.cfg = cfg
        self.ident = ident
        self.peer_id = ident.peer_id
        self.counters = Counters()
        self.table = PeerTable(self.peer_id, cfg.ping_misses, cfg.profile_ttl_s)
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.addrs: list[str] = []
        self.profile_fields: dict[str, Any] = {}
        self.state: dict[str, Any] = {"kind": "idle", "job": None, "hop": None}
        self._profile_dirty = trio.Event()
        self._profile_cache: dict[str, Any] | None = None
        self.status_extra: list[Callable[[], dict[str, Any]]] = []
        self.allowed_set = set(cfg.allowed_peers)
        self.host: Any = None
        self.gossip: Gossip | None = None
        self.discovery: Discovery | None = None
        self.liveness: Liveness | None = None
        self.control: ControlServer | None = None
        self.nursery: trio.Nursery | None = None
        self.peer_events: list[Callable[[str, str], None]] = []
        self.profile_events: list[Callable[[dict[str, Any]], None]] = []
        self.node_json_extra: dict[str, Any] = {}
        self._private_dir: Path | None = None

    # --- policy -------------------------------------------------------------------------------
    def allowed(self, peer_id: str) -> bool:
        return not self.allowed_set or peer_id in self.allowed_set or peer_id == self.peer_id

    # --- profile ------------------------------------------------------------------------------
    def profile(self) -> dict[str, Any]:
        if self._profile_cache is None:
            self._profile_cache = {
                "v": 1,
                "peer_id": self.peer_id,
                "seq": time.time_ns(),
                "addrs": self.addrs,
                "role": self.cfg.role,
                "version": __version__,
                "network": self.cfg.network,
                "state": dict(self.state),
                **self.profile_fields,
            }
        return self._profile_cache

    def profile_changed(self) -> None:
        """Call after changing profile_fields or state: a new seq is published promptly."""
        self._profile_cache = None
        self._profile_dirty.set()

    def set_state(self, kind: str, job: str | None = None, hop: int | None = None) -> None:
        """The node's activity, shown in status and carried by the next profile refresh. It changes several
        times per hop, so it does not trigger a publication of its own (measured: profile updates per hop
        were a large share of the gossip bytes); a busy node says so in its Decline."""
        new = {"kind": kind, "job": job, "hop": hop}
        if new != self.state:
            self.state = new
            self._profile_cache = None

    async def _profile_loop(self) -> None:
        assert self.gossip is not None
        last = 0.0
        while True:
            with trio.move_on_after(self.cfg.profile_refresh_s):
                await self._profile_dirty.wait()
            self._profile_dirty = trio.Event()
            # Coalesce bursts of changes: at most ~4 profiles per second.
            wait = 0.25 - (time.monotonic() - last)
            if wait > 0:
                await trio.sleep(wait)
            self._profile_cache = None  # refresh = a new seq, so peers see we are still here
            await self.gossip.publish("profiles", profile_mod.encode(self.profile()))
            last = time.monotonic()

    def _on_profile(self, prof: dict[str, Any]) -> None:
        result = self.table.on_profile(prof, time.monotonic())
        if result == "new":
            log.info("peer_profile", peer=prof["peer_id"], role=prof["role"])
        if result != "stale":
            if self.discovery is not None:
                self.discovery.wake()
            for cb in self.profile_events:
                try:
                    cb(prof)
                except Exception as exc:  # noqa: BLE001 - observers must not break discovery
                    log.error("profile_event_failed", error=f"{type(exc).__name__}: {exc}")

    async def _gossip_profile(self, sender: str, obj: dict[str, Any]) -> None:
        prof = profile_mod.decode(obj)
        if prof["peer_id"] != sender:
            raise wire.WireError("profile peer_id differs from the gossip signer", "forged")
        if prof["network"] != self.cfg.network:
            return
        self._on_profile(prof)

    def _on_peer_change(self, event: str, pid: str) -> None:
        if event == "up":
            log.info("peer_up", peer=pid)
        for cb in self.peer_events:
            try:
                cb(event, pid)
            except Exception as exc:  # noqa: BLE001 - observers must not break liveness
                log.error("peer_event_failed", error=f"{type(exc).__name__}: {exc}")

    def _on_connected(self, pid: str) -> None:
        if not self.allowed(pid):  # an outbound dial; inbound connections are checked in Liveness
            self.counters.add("reject.connection.peer_not_allowed")
            if self.nursery is not None:
                self.nursery.start_soon(self._disconnect, pid)
            return
        if self.liveness is not None:
            self.liveness._send.send_nowait(("connected", pid))

    async def _disconnect(self, pid: str) -> None:
        from libp2p.peer.id import ID

        with trio.move_on_after(2):
            try:
                await self.host.disconnect(ID.from_base58(pid))
            except Exception:  # noqa: BLE001
                pass

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRE_TICK_S)
            for pid in self.table.expire(time.monotonic()):
                log.debug("peer_forgotten", peer=pid)

    # --- control ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        live = self.table.live()
        out = {
            "peer_id": self.peer_id,
            "role": self.cfg.role,
            "network": self.cfg.network,
            "version": __version__,
            "addrs": self.addrs,
            "peers": sum(1 for e in live if e.profile is not None),
            "connections": len(live),
            "uptime_s": round(time.monotonic() - self._t0, 3),
            "state": self.state,
            "pid": os.getpid(),
            "counters": self.counters.snapshot(),
            "profile": self.profile(),
        }
        for extra in self.status_extra:
            out.update(extra())
        return out

    async def _op_status(self, args: wire.Fields) -> Any:
        return self.status()

    async def _op_peers(self, args: wire.Fields) -> Any:
        if args.bool("all", required=False):
            rows = self.table.view_all(time.monotonic())
            connected = self.liveness.connected_ids() if self.liveness else set()
            for r in rows:
                r["libp2p_connected"] = r["peer_id"] in connected
            return rows
        return self.table.view(time.monotonic())

    def register_protocol(self, protocol: str, name: str, fn: Callable[[host_mod.StreamIO], Awaitable[None]]
                          ) -> None:
        """Serve a `/snake/<name>/<semver>` protocol on this node's host. Always behind the stream-handler
        wrapper (nothing `fn` raises reaches libp2p; refusals become `error` frames and `reject.<name>.<kind>`
        counters) and the node's peer allowlist: there is no way to open a protocol to peers the
        configuration closed the network to. Call it once the host runs (from `run`'s `extra`)."""
        if self.host is None:
            raise RuntimeError(f"register {protocol} from NetService.run's `extra`: the host is not built yet")
        host_mod.register(self.host, protocol, name, fn, self.counters, self.allowed)

    def register_ops(self, ops: dict[str, Callable[[wire.Fields], Awaitable[Any]]]) -> None:
        assert self.control is not None
        for name, fn in ops.items():
            self.control.op(name, fn)

    # --- lifecycle ----------------------------------------------------------------------------
    def write_node_json(self) -> None:
        assert self.control is not None
        home_mod.write_json_atomic(self.cfg.home / home_mod.NODE_JSON, {
            "peer_id": self.peer_id,
            "addrs": self.addrs,
            "control": str(self.control.path),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "role": self.cfg.role,
            "network": self.cfg.network,
            **self.node_json_extra,
        })

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  extra: Callable[[trio.Nursery], Awaitable[None]] | None = None) -> None:
        cfg = self.cfg
        host_mod.preflight_ports(cfg.listen)
        self.host = host_mod.build_host(self.ident, cfg.max_peers, cfg.announce or None, cfg.mdns)
        sock_path, self._private_dir = home_mod.control_socket_path(cfg.home)
        self.control = ControlServer(sock_path, self.counters, log)
        self.control.op("status", self._op_status)
        self.control.op("peers", self._op_peers)
        try:
            async with self.host.run(listen_addrs=host_mod.listen_addrs(cfg.listen)):
                logs.quiet()
                host_mod.check_listening(self.host, cfg.listen)
                self.addrs = host_mod.dialable_addrs(self.host)
                self.liveness = Liveness(self.host, self.table, self.counters, cfg.ping_interval_s,
                                         cfg.ping_timeout_s, self._on_peer_change,
                                         self.allowed if self.allowed_set else None)
                self.host.get_network().register_notifee(self.liveness.notifee())
                self.gossip = Gossip(self.host, cfg.network, self.counters, self.allowed)
                self.gossip.on("profiles", self._gossip_profile)
                self.discovery = Discovery(self.host, self.table, self.counters, self.profile, self._on_profile,
                                           self._on_connected, cfg.bootstrap, cfg.max_peers, self.allowed)
                unregister_mdns = start_mdns_listener(self.discovery) if cfg.mdns else None
                try:
                    async with trio.open_nursery() as nursery:
                        self.nursery = nursery
                        await nursery.start(self.liveness.run)
                        await nursery.start(self.gossip.run)
                        await nursery.start(self.control.run)
                        if extra is not None:
                            await extra(nursery)
                        await nursery.start(self.discovery.run)
                        nursery.start_soon(self._profile_loop)
                        nursery.start_soon(self._expire_loop)
                        self.write_node_json()
                        log.info("listening", peer_id=self.peer_id, addrs=self.addrs, role=cfg.role,
                                 network=cfg.network)
                        task_status.started()
                finally:
                    if unregister_mdns is not None:
                        unregister_mdns()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        try:
            info = home_mod.read_node_json(self.cfg.home)
            if info and info.get("pid") == os.getpid():
                (self.cfg.home / home_mod.NODE_JSON).unlink()
        except FileNotFoundError:
            pass
        if self.control is not None:
            try:
                self.control.path.unlink()
            except FileNotFoundError:
                pass
        if self._private_dir is not None:
            try:
                self._private_dir.rmdir()
            except OSError:
                pass
