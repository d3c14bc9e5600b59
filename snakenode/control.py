"""Local control API: the CLI talks to its daemon over a unix socket (0600, same uid only).

Requests and replies are single frames (4-byte length + msgpack): `{"op", "args"}` ->
`{"ok": true, "result"}` or `{"ok": false, "kind", "error"}`. The client side imports neither torch nor
libp2p, so `snakenode status` answers in well under half a second.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from snakenode import home as home_mod
from snakenode import wire

OpHandler = Callable[[wire.Fields], Awaitable[Any]]
MAX_REQUEST = 1 * 2**20
MAX_REPLY = 64 * 2**20  # fetch metadata and merged hop logs can be large
CONTROL_TIMEOUT_S = 5.0


class ControlError(Exception):
    """An error reply from the daemon (bad request, unknown job...). `kind` names it."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class ControlServer:
    def __init__(self, path: Path, counters: Any, log: Any) -> None:
        self.path = path
        self.ops: dict[str, OpHandler] = {}
        self.counters = counters
        self.log = log

    def op(self, name: str, handler: OpHandler) -> None:
        self.ops[name] = handler

    async def run(self, task_status: Any) -> None:
        import trio

        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600: only our uid may connect
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve, [listener])
                task_status.started()
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _serve(self, stream: Any) -> None:
        import trio

        try:
            creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (os.getuid(), 0):
                self.counters.add("reject.control.uid")
                self.log.warning("control_rejected", reason="uid", uid=uid)
                return
            with trio.fail_after(CONTROL_TIMEOUT_S):
                header = await _recv_exact(stream, 4)
                (length,) = wire.HEADER.unpack(header)
                if length > MAX_REQUEST:
                    raise wire.WireError(f"request of {length} bytes exceeds {MAX_REQUEST}", "oversize")
                obj = wire.unpackb(await _recv_exact(stream, length), MAX_REQUEST)
            f = wire.Fields(obj, "request")
            op = f.str("op", 64)
            handler = self.ops.get(op)
            if handler is None:
                reply: dict[str, Any] = {"ok": False, "kind": "unknown_op",
                                         "error": f"unknown operation {op!r}; this node knows: "
                                                  f"{', '.join(sorted(self.ops))}"}
            else:
                try:
                    reply = {"ok": True, "result": await handler(f.map("args", required=False))}
                except ControlError as exc:
                    reply = {"ok": False, "kind": exc.kind, "error": str(exc)}
                except wire.WireError as exc:
                    reply = {"ok": False, "kind": exc.kind, "error": str(exc)}
            payload = wire.packb(reply)
            await stream.send_all(wire.HEADER.pack(len(payload)) + payload)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            self.counters.add("reject.control.io")
        except wire.WireError as exc:
            self.counters.add(f"reject.control.{exc.kind}")
        except Exception as exc:  # noqa: BLE001 - a bad request must never take the daemon down
            self.counters.add("error.control")
            self.log.error("control_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with trio.move_on_after(1):
                await stream.aclose()


async def _recv_exact(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise wire.WireError("control connection closed early", "truncated")
        buf += chunk
    return bytes(buf)


def _recv_exact_sync(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("daemon closed the control connection")
        buf += chunk
    return bytes(buf)


def call(home: Path, op: str, args: dict[str, Any] | None = None, timeout: float = CONTROL_TIMEOUT_S) -> Any:
    """One request to the daemon in HOME. Raises home.NoDaemon, ControlError or TimeoutError."""
    home = Path(home).expanduser().resolve()
    info = home_mod.live_node_json(home)
    path = info.get("control")
    if not path:
        raise home_mod.NoDaemon(home)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise home_mod.NoDaemon(home) from None
        payload = wire.packb({"op": op, "args": args or {}})
        sock.sendall(wire.HEADER.pack(len(payload)) + payload)
        (length,) = wire.HEADER.unpack(_recv_exact_sync(sock, 4))
        if length > MAX_REPLY:
            raise ControlError(f"reply of {length} bytes is too large", "oversize")
        reply = wire.unpackb(_recv_exact_sync(sock, length), MAX_REPLY)
    except TimeoutError:
        raise TimeoutError(f"the node in {home} did not answer within {timeout:g} s") from None
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from the daemon")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")), str(reply.get("kind", "error")))
    return reply.get("result")
