"""Request/response protocols as handler tables: each part of the node registers the message kinds it owns.

One table serves `/snake/state/1.0.0` (leases, releases, resume queries, records, jobs, checkpoints,
layers, custody; docs/PROTOCOL.md) and one `/snake/cs/1.0.0` (assign, upload). A kind has exactly one
owner: registering it twice is a programming error, caught at start-up. An unknown kind is the peer's
error (`unexpected`), answered by the stream handler's error frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from snakenode import wire
from snakenode.control import ControlError
from snakenode.net import host as host_mod
from snakenode.net.service import NetService

# A handler gets the stream and the request's fields. It returns the reply frame, or None when it wrote
# the reply itself (a reply followed by raw bytes, or a conversation of several frames).
Handler = Callable[[Any, wire.Fields], Awaitable[dict[str, Any] | None]]

STATE_TIMEOUT_S = 5.0
STATE_REQUEST_LIMIT = 64 * 1024
STATE_REPLY_LIMIT = 8 * 2**20


class RegistrationError(Exception):
    pass


class HandlerTable:
    def __init__(self, protocol: str, name: str, request_limit: int) -> None:
        self.protocol = protocol
        self.name = name  # in error messages: "unknown state message 'x'"
        self.request_limit = request_limit
        self._handlers: dict[str, Handler] = {}

    def register(self, kind: str, handler: Handler) -> None:
        if kind in self._handlers:
            raise RegistrationError(f"{self.protocol}: message kind {kind!r} already has a handler "
                                    f"({getattr(self._handlers[kind], '__qualname__', '?')}); each kind has one owner")
        self._handlers[kind] = handler

    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    async def dispatch(self, io: Any, kind: str, f: wire.Fields) -> None:
        handler = self._handlers.get(kind)
        if handler is None:
            raise wire.WireError(f"unknown {self.name} message {kind!r}", "unexpected")
        reply = await handler(io, f)
        if reply is not None:
            await io.write_frame(reply)

    async def serve(self, io: host_mod.StreamIO) -> None:
        kind, f = await io.read_frame(limit=self.request_limit)
        await self.dispatch(io, kind, f)


class StateClient:
    """Ask a peer one question on `/snake/state/1.0.0`; an `error` reply raises ControlError."""

    def __init__(self, svc: NetService) -> None:
        self.svc = svc  # its host exists once the service runs
        self.counters = svc.counters

    async def request(self, peer: str, msg: dict[str, Any]) -> tuple[str, wire.Fields]:
        with trio.fail_after(STATE_TIMEOUT_S):
            io = await host_mod.open_stream(self.svc.host, peer, wire.PROTO_STATE, self.counters, "state")
            try:
                await io.write_frame(msg)
                kind, f = await io.read_frame(limit=STATE_REPLY_LIMIT)
            finally:
                await io.close()
        if kind == "error":
            raise ControlError(f.str("error", 1000, required=False), f.str("kind", 64, required=False))
        return kind, f
