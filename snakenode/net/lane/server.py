"""The lane's TCP listener: offers made during negotiation, the TLS handshake and hello that redeem one,
and the bundle handler that serves the authenticated connection."""

from __future__ import annotations

import hmac
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from snakenode import logs, wire
from snakenode.counters import Counters
from snakenode.net import transfer
from snakenode.net.host import ListenError
from snakenode.net.lane.conn import Conn, LaneError, in_thread
from snakenode.net.lane.offer import LANE_ID_PREFIX, LANE_VERSION, LaneCert, LaneOffer, fingerprint
from snakenode.net.lane.receive import LaneIO
from snakenode.net.lane.tls import HANDSHAKE_TIMEOUT_S, pinned_context, tls_base

log = logs.get("lane")

DEFAULT_TTL_S = 60.0  # an offer unused for this long is forgotten (a later re-proposal gets a new one)
MAX_PENDING = 64  # outstanding offers; the oldest is dropped beyond this
MAX_CONNECTIONS = 8  # concurrent lane connections (handshakes included); more are closed at once
HELLO_LIMIT = 4096


LaneHandler = Callable[[LaneIO], Awaitable[None]]


@dataclass
class _Expected:
    lane_id: str
    token: bytes
    peer_id: str
    peer_fp: str
    handler: LaneHandler
    deadline: float
    ctx: ssl.SSLContext | None  # None in plaintext (benchmark) mode


class _Refused(Exception):
    def __init__(self, message: str, kind: str, tell_peer: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.tell_peer = tell_peer


class LaneServer:
    """The lane's TCP listener. Start it in the daemon's nursery (`port = await nursery.start(srv.serve)`),
    call `expect(...)` when accepting a proposal and put `offer.to_wire()` into the Accept.

    Survives garbage: a connection that fails the TLS handshake, presents another certificate, names an
    unknown lane or a wrong/used/expired token, or stays silent, is dropped, logged and counted as
    `reject.lane.<kind>`; the listener keeps serving. At most `max_connections` connections are handled at
    once (the rest are closed immediately, `reject.lane.busy`), each bounded by `handshake_timeout` until it
    has authenticated and by per-read timeouts afterwards.

    `plaintext_for_benchmark=True` drops TLS (same code otherwise) so benchmarks/transfer.py can measure
    what encryption costs. It is not reachable from any configuration setting; never use it in a node.
    """

    def __init__(self, counters: Counters, *, host: str = "0.0.0.0", port: int = 0,
                 max_connections: int = MAX_CONNECTIONS, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 plaintext_for_benchmark: bool = False) -> None:
        self.counters = counters
        self.handshake_timeout = handshake_timeout
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.plaintext = plaintext_for_benchmark
        self._pending: dict[str, _Expected] = {}
        self._lock = threading.Lock()  # _pending is read from handshake threads (SNI callback)
        self._active = 0
        self._tl = threading.local()
        self._base = self._base_context()

    # ----------------------------------------------------------------------------------------- offers
    def expect(self, peer_id: str, peer_cert: bytes, handler: LaneHandler, *, ttl: float = DEFAULT_TTL_S,
               advertise_port: int | None = None) -> LaneOffer:
        """Register one transfer from `peer_id`, who must present `peer_cert` (from its Propose).
        `handler(io)` serves the connection once it has authenticated, exactly like a `/snake/bundle/1.0.0`
        stream handler. Returns the offer for the Accept. One connection may use it, within `ttl` seconds."""
        if not self.port:
            raise LaneError("the lane server is not listening yet (start serve() first)", "not_started")
        own = LaneCert.generate()
        lane_id = LANE_ID_PREFIX + secrets.token_hex(16)
        token = secrets.token_bytes(32)
        ctx = None if self.plaintext else pinned_context(True, own, peer_cert)
        exp = _Expected(lane_id, token, peer_id, fingerprint(peer_cert), handler, time.monotonic() + ttl, ctx)
        with self._lock:
            self._purge()
            while len(self._pending) >= MAX_PENDING:
                dropped = next(iter(self._pending))
                del self._pending[dropped]
                self.counters.add("lane.offer.dropped")
                log.warning("lane_offer_dropped", lane=dropped, reason="too many outstanding offers")
            self._pending[lane_id] = exp
        return LaneOffer(advertise_port or self.port, lane_id, token, own.der)

    def cancel(self, lane_id: str) -> None:
        """Forget an offer (the bundle came over libp2p, or the reservation ended)."""
        with self._lock:
            self._pending.pop(lane_id, None)

    @property
    def pending(self) -> int:
        with self._lock:
            self._purge()
            return len(self._pending)

    def _purge(self) -> None:
        now = time.monotonic()
        for k in [k for k, e in self._pending.items() if e.deadline < now]:
            del self._pending[k]

    # ----------------------------------------------------------------------------------------- TLS
    def _base_context(self) -> ssl.SSLContext:
        """The listener's context: no certificate and no trust anchor of its own. The SNI callback swaps in
        the offer's pinned context; an unknown lane id ends the handshake with `unrecognized_name`."""
        ctx = tls_base(True)

        def select(sslobj: ssl.SSLSocket | ssl.SSLObject, server_name: str | None,
                   _ctx: ssl.SSLContext) -> int | None:
            with self._lock:
                exp = self._pending.get(server_name or "")
                live = exp is not None and exp.deadline >= time.monotonic() and exp.ctx is not None
            if not live:
                self._tl.unknown_lane = True  # read back by _authenticate, in this same thread
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            assert exp is not None and exp.ctx is not None
            sslobj.context = exp.ctx
            return None

        ctx.sni_callback = select
        return ctx

    def _authenticate(self, guard: Conn) -> _Expected:
        """Blocking: TLS handshake, certificate pin, hello with lane id and token, `lane_ok`. `guard.sock`
        follows the socket (raw, then TLS) so a cancelled caller can always shut it down."""
        deadline = time.monotonic() + self.handshake_timeout

        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise _Refused("no complete hello within the handshake timeout", "timeout")
            return t

        exp_tls: _Expected | None = None
        if not self.plaintext:
            guard.sock.settimeout(left())
            self._tl.unknown_lane = False
            try:
                tls = self._base.wrap_socket(guard.sock, server_side=True, do_handshake_on_connect=False)
                guard.sock = tls
                tls.do_handshake()
            except TimeoutError:
                raise _Refused("no complete TLS handshake within the handshake timeout", "timeout") from None
            except (ssl.SSLError, OSError) as exc:
                if getattr(self._tl, "unknown_lane", False):
                    raise _Refused("TLS SNI names no lane offered here (not negotiated, used or expired)",
                                   "not_negotiated") from None
                kind = "pin_mismatch" if isinstance(exc, ssl.SSLCertVerificationError) else "handshake"
                raise _Refused(f"TLS handshake failed: {exc}", kind) from None
            if tls.version() != "TLSv1.3":
                raise _Refused(f"negotiated {tls.version()}, only TLS 1.3 is accepted", "handshake")
            with self._lock:
                exp_tls = next((e for e in self._pending.values() if e.ctx is tls.context), None)
            if exp_tls is None:
                raise _Refused("the lane's offer expired during the handshake", "expired")
            der = tls.getpeercert(binary_form=True)
            if not der or not hmac.compare_digest(fingerprint(der), exp_tls.peer_fp):
                raise _Refused("the peer's certificate is not the one pinned in the negotiation", "pin_mismatch")
        try:
            return self._hello(guard, exp_tls, left)
        except _Refused as exc:
            if exc.tell_peer:  # the peer is authenticated (or it is the benchmark): say what went wrong
                try:
                    guard.send(wire.frame({"t": "error", "kind": exc.kind, "error": str(exc)[:500]}), 2)
                except OSError:
                    pass
            raise

    def _hello(self, conn: Conn, exp_tls: _Expected | None, left: Callable[[], float]) -> _Expected:
        try:
            kind, f = conn.read_frame(HELLO_LIMIT, left())
        except TimeoutError:
            raise _Refused("no hello within the handshake timeout", "timeout") from None
        except wire.WireError as exc:
            raise _Refused(f"bad hello: {exc}", exc.kind, tell_peer=exc.kind != "truncated") from None
        except OSError as exc:
            raise _Refused(f"connection failed before hello: {exc}", "handshake") from None
        if kind != "lane_hello":
            raise _Refused(f"expected lane_hello, got {kind!r}", "unexpected", tell_peer=True)
        try:
            lane_id, token = f.str("id", 64), f.bytes("token", 64)
        except wire.WireError as exc:
            raise _Refused(f"bad hello: {exc}", exc.kind, tell_peer=True) from None
        with self._lock:
            exp = self._pending.get(lane_id)
            if exp is None or (exp_tls is not None and exp is not exp_tls):
                raise _Refused("no transfer was negotiated for this lane id (or it was used or expired)",
                               "not_negotiated", tell_peer=True)
            if not hmac.compare_digest(token, exp.token):
                raise _Refused("wrong token for this lane", "bad_token", tell_peer=True)
            if exp.deadline < time.monotonic():
                del self._pending[lane_id]
                raise _Refused("this lane offer expired: negotiate again", "expired", tell_peer=True)
            del self._pending[lane_id]  # one connection per offer: the token is spent now
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.send(wire.frame({"t": "lane_ok", "v": LANE_VERSION}), left())
        return exp

    # ----------------------------------------------------------------------------------------- serving
    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = trio.socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await listener.bind((self.host, self.port))
        except OSError as exc:
            listener.close()
            raise ListenError(f"the bulk lane cannot listen on {self.host}:{self.port} ({exc.strerror}); set "
                              "lane_port = 0 for any free port, or stop the program that holds it") from None
        listener.listen(64)
        self.port = listener.getsockname()[1]
        log.info("lane_listening", host=self.host, port=self.port, tls=not self.plaintext)
        task_status.started(self.port)
        with listener:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        tsock, addr = await listener.accept()
                    except OSError as exc:  # e.g. out of file descriptors: keep the listener alive
                        self.counters.add("error.lane.accept")
                        log.error("lane_accept_failed", error=str(exc))
                        await trio.sleep(0.1)
                        continue
                    if self._active >= self.max_connections:
                        self.counters.add("reject.lane.busy")
                        log.warning("lane_rejected", addr=_fmt_addr(addr), kind="busy")
                        tsock.close()
                        continue
                    self._active += 1
                    nursery.start_soon(self._connection, tsock, addr)

    async def _connection(self, tsock: trio.socket.SocketType, addr: Any) -> None:
        conn: Conn | None = None
        try:
            raw = socket.socket(fileno=tsock.detach())
            raw.setblocking(True)
            conn = Conn(raw)
            try:
                exp = await in_thread(lambda: self._authenticate(conn), conn)
            except _Refused as exc:
                self.counters.add(f"reject.lane.{exc.kind}")
                log.warning("lane_rejected", addr=_fmt_addr(addr), kind=exc.kind, error=str(exc)[:300])
                return
            self.counters.add("lane.accepted")
            log.info("lane_accepted", peer=exp.peer_id, lane=exp.lane_id, addr=_fmt_addr(addr))
            await self._run_handler(exp, LaneIO(conn, self.counters, exp.peer_id))
        except Exception as exc:  # noqa: BLE001 - nothing a connection does may stop the listener
            self.counters.add("error.lane.connection")
            log.error("lane_connection_failed", addr=_fmt_addr(addr), error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self._active -= 1
            if conn is not None:
                conn.close()
            else:
                tsock.close()

    async def _run_handler(self, exp: _Expected, io: LaneIO) -> None:
        """safe_handler's contract for the lane: nothing escapes; refusals reach the sender as error frames."""
        try:
            await exp.handler(io)
        except (wire.WireError, transfer.TransferError) as exc:
            self.counters.add(f"reject.lane.{exc.kind}")
            log.warning("lane_transfer_rejected", peer=exp.peer_id, kind=exc.kind, error=str(exc)[:300])
            kind, message = exc.kind, str(exc)
            with trio.move_on_after(3):
                try:
                    await in_thread(lambda: _tell_and_drain(io.conn, kind, message), io.conn)
                except Exception:  # noqa: BLE001 - the peer may be gone
                    pass
        except trio.TooSlowError:
            self.counters.add("reject.lane.timeout")
            log.warning("lane_transfer_rejected", peer=exp.peer_id, kind="timeout")
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - the point: a bad transfer never reaches the nursery
            self.counters.add("error.handler.lane")
            log.error("lane_handler_failed", peer=exp.peer_id, error=f"{type(exc).__name__}: {exc}"[:300])


def _fmt_addr(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def _tell_and_drain(conn: Conn, kind: str, message: str) -> None:
    """Send an error frame, then read and discard what the sender still has in flight (briefly), so closing
    does not turn into a TCP reset that could destroy the frame before the sender reads it."""
    conn.send(wire.frame({"t": "error", "kind": kind, "error": message[:500]}), 2)
    try:
        socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        buf = bytearray(1 << 16)
        deadline = time.monotonic() + 1.0
        drained = 0
        while time.monotonic() < deadline and drained < 64 * 2**20:
            conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            k = conn.sock.recv_into(buf)
            if not k:
                break
            drained += k
    except OSError:
        pass
