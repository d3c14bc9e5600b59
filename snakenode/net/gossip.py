"""Gossip on gossipsub: the network's small, periodic, idempotent messages.

Topics `snake/<net>/{profiles,jobs,progress}/1`. Messages are signed by libp2p and verified (kept on);
a topic validator drops anything oversized, undecodable, or from a peer outside `allowed_peers` before
it is relayed. Handlers see decoded maps; a handler that raises is logged and counted, never fatal.
Heartbeat 1 s (the library default of 120 s would make the mesh useless for minutes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from snakenode import logs, wire
from snakenode.counters import Counters

log = logs.get("gossip")

GossipHandler = Callable[[str, dict[str, Any]], Awaitable[None]]  # (sender peer id, message)


class _LeanPubsub(Pubsub):
    """py-libp2p attaches the node's signed peer record (~230 bytes) to every gossip RPC, including each
    forwarded message and each control message. Peers get it in the first RPC of every stream (the one
    carrying our subscriptions) and from identify; the rest go without it. Measured on a 5-node job: 36% of
    the gossip RPC bytes were these records."""

    async def write_msg(self, stream: Any, rpc_msg: Any) -> bool:
        if not rpc_msg.subscriptions and rpc_msg.HasField("senderRecord"):
            rpc_msg.ClearField("senderRecord")
        return await super().write_msg(stream, rpc_msg)


class Gossip:
    def __init__(self, host: IHost, network: str, counters: Counters,
                 allowed: Callable[[str], bool] | None = None) -> None:
        self.host = host
        self.network = network
        self.counters = counters
        self.allowed = allowed
        self.self_id = host.get_id().to_string()
        self.router = GossipSub(
            # Not v1.2: py-libp2p sends an IDONTWANT to every mesh peer for every message received, however
            # small (the spec means it for large ones); our messages are < 1 KB, and the IDONTWANT RPCs were
            # 57% of all gossip RPCs in a 5-node job while saving few duplicates.
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
            # A sparse mesh: py-libp2p forwards every message to every mesh peer, and with degree 6 a small
            # network is a full mesh (measured: ~25 transmissions per message among 6 peers). IHAVE/IWANT
            # gossip repairs what the mesh misses; our messages are periodic and idempotent anyway.
            degree=3,
            degree_low=2,
            degree_high=5,
            heartbeat_interval=1,
            heartbeat_initial_delay=0.1,
            # Profiles of many nodes may be published in the same second at start-up; the library's
            # default of 10 messages/s per topic would silently drop some of them.
            max_messages_per_topic_per_second=200.0,
            # Every test peer lives on 127.0.0.1, and small LANs share few addresses: IP-diversity
            # eclipse protection would keep the mesh from forming there.
            eclipse_protection_enabled=False,
        )
        self.pubsub = _LeanPubsub(host, self.router, max_inbound_rpc_size=4 * wire.GOSSIP_MAX)
        self.handlers: dict[str, GossipHandler] = {}

    def topic(self, name: str) -> str:
        return wire.topic(self.network, name)

    def on(self, name: str, handler: GossipHandler) -> None:
        self.handlers[name] = handler

    def _validator(self, name: str) -> Callable[[ID, Any], bool]:
        def validate(forwarder: ID, msg: Any) -> bool:
            try:
                sender = ID(msg.from_id).to_string()
            except Exception:  # noqa: BLE001
                return False
            if self.allowed is not None and not self.allowed(sender):
                self.counters.add(f"reject.gossip.{name}.peer_not_allowed")
                return False
            if len(msg.data) > wire.GOSSIP_MAX:
                self.counters.add(f"reject.gossip.{name}.oversize")
                return False
            return True

        return validate

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            await self.pubsub.wait_until_ready()
            async with trio.open_nursery() as nursery:
                for name in wire.TOPIC_NAMES:
                    topic = self.topic(name)
                    self.pubsub.set_topic_validator(topic, self._validator(name), False)
                    sub = await self.pubsub.subscribe(topic)
                    nursery.start_soon(self._receive, name, sub)
                task_status.started()
                await trio.sleep_forever()

    async def _receive(self, name: str, sub: Any) -> None:
        while True:
            msg = await sub.get()
            try:
                sender = ID(msg.from_id).to_string()
            except Exception:  # noqa: BLE001
                self.counters.add(f"reject.gossip.{name}.malformed")
                continue
            if sender == self.self_id:
                continue
            self.counters.add(f"bytes.gossip.{name}.in", len(msg.data))
            try:
                obj = wire.unpackb(msg.data, wire.GOSSIP_MAX)
                if not isinstance(obj, dict):
                    raise wire.WireError("gossip message is not a map")
                handler = self.handlers.get(name)
                if handler is not None:
                    await handler(sender, obj)
            except wire.WireError as exc:
                self.counters.add(f"reject.gossip.{name}.{exc.kind}")
                log.warning("gossip_rejected", topic=name, peer=sender, error=str(exc)[:200])
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the topic
                self.counters.add(f"error.gossip.{name}")
                log.error("gossip_handler_failed", topic=name, peer=sender, error=f"{type(exc).__name__}: {exc}")

    async def publish(self, name: str, data: bytes) -> None:
        if len(data) > wire.GOSSIP_MAX:
            raise wire.WireError(f"refusing to publish {len(data)} bytes on {name}", "oversize")
        try:
            await self.pubsub.publish(self.topic(name), data)
            self.counters.add(f"bytes.gossip.{name}.out", len(data))
        except Exception as exc:  # noqa: BLE001 - publishing is best effort; periodic refresh repairs
            self.counters.add(f"error.gossip.publish.{name}")
            log.warning("gossip_publish_failed", topic=name, error=f"{type(exc).__name__}: {exc}")
