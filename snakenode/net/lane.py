"""The fast bulk lane: bundle bytes over a separate TCP connection secured with TLS 1.3.

Why: py-libp2p's Noise+Yamux stream is CPU-bound at ~80 MB/s and ~1 CPU-second per 100 MB on each side
(../shared/notes/libp2p.md). Python's `ssl` keeps every per-record step (AES-GCM, framing) in OpenSSL, so a
blocking socket driven from a worker thread moves bundle bytes at close to plain-TCP speed.

Who-is-who does not change: the lane is set up only through the already-authenticated negotiate exchange.
The sender puts a fresh self-signed certificate into its Propose; the receiver's Accept carries a fresh
certificate of its own, a lane id (sent as TLS SNI) and a one-time 32-byte token. Each side then accepts
exactly the other's certificate on the lane (mutual TLS pinned to certificates learnt over Noise), and the
receiver binds the connection to the peer id the negotiation ran with. Everything after the `lane_ok` reply
is byte-for-byte the `/snake/bundle/1.0.0` exchange (transfer.py's manifest frame, raw layer bytes, ack),
so the store's partial files, per-layer sha256 and resume work exactly as on the libp2p path. The
construction and why it is sound: docs/PROTOCOL.md, "Fast bulk lane".

Threads: every socket operation runs in a trio worker thread with a blocking socket and a timeout; the whole
per-layer receive loop (recv, sha256, file append, verification) is one thread call, so no per-chunk work
crosses into the event loop. A cancelled call shuts the socket down so its thread ends promptly.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from snakenode import logs, wire
from snakenode.counters import Counters
from snakenode.faults import Faults
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.sink import READ_CHUNK, FinishedLayer, LayerSink
from snakenode.layers.store import LayerStore
from snakenode.net import transfer
from snakenode.net.host import ListenError, StreamIO

log = logs.get("lane")

LANE_VERSION = 1
LANE_MIN_BYTES = 8 * 2**20  # smaller bundles go over libp2p: the extra connection is not worth it
DEFAULT_TTL_S = 60.0  # an offer unused for this long is forgotten (a later re-proposal gets a new one)
HANDSHAKE_TIMEOUT_S = 10.0  # TCP accept -> TLS handshake -> hello -> lane_ok, all of it
CONNECT_TIMEOUT_S = 5.0
FILL_S = 1.0  # a receive returns what arrived within this long, so a trickle still reaches the rate guard
SEND_TIMEOUT_S = 60.0  # a write may wait while the receiver verifies and fsyncs a large layer
MAX_PENDING = 64  # outstanding offers; the oldest is dropped beyond this
MAX_CONNECTIONS = 8  # concurrent lane connections (handshakes included); more are closed at once
HELLO_LIMIT = 4096
MAX_CERT_BYTES = 4096
LANE_ID_PREFIX = "lane-"
_LANE_ID_RE = re.compile(r"^lane-[0-9a-f]{32}$")
_T = TypeVar("_T")


class LaneError(Exception):
    """The lane could not be used; `kind` names the reason (counter suffix, log field)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class LaneUnavailable(LaneError):
    """Raised before any bundle byte moved: the caller may fall back to the libp2p stream."""


# ============================================================================================ certificates


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, lowercase hex: what each side pins."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class LaneCert:
    """A per-transfer self-signed ECDSA P-256 certificate and its private key (which never leaves memory:
    it is handed to OpenSSL through an anonymous memfd where the platform has one)."""

    der: bytes
    pem_chain: bytes = field(repr=False)  # private key + certificate, PEM

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)

    @classmethod
    def generate(cls) -> LaneCert:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "snakenode-lane")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # Freshness comes from the one-time pin, not from dates: a wide validity window means clock
            # skew between peers can never break the handshake.
            .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
            .sign(key, hashes.SHA256())
        )
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)
        return cls(cert.public_bytes(serialization.Encoding.DER), pem)


def check_cert(der: Any, where: str) -> bytes:
    """A peer's certificate from a negotiate message: bounded DER that parses (the pin is its sha256)."""
    if not isinstance(der, bytes) or not 0 < len(der) <= MAX_CERT_BYTES:
        raise wire.WireError(f"{where} must be a DER certificate of at most {MAX_CERT_BYTES} bytes", "malformed")
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        raise wire.WireError(f"{where} is not a DER X.509 certificate", "malformed") from None
    return der


def _load_cert_chain(ctx: ssl.SSLContext, cert: LaneCert) -> None:
    """`SSLContext.load_cert_chain` reads only files: give it an anonymous in-memory file when possible."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("snakenode-lane", 0)
        try:
            os.write(fd, cert.pem_chain)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # /proc not mounted: fall through to a private temporary file
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(prefix=".lane-")  # 0600
    try:
        os.write(fd, cert.pem_chain)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def _tls_base(server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED  # both sides present and verify a certificate (mutual auth)
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    if server:
        ctx.num_tickets = 0  # no resumption: every connection proves possession of the pinned key
    else:
        ctx.check_hostname = False  # no names: the certificate itself is pinned
    return ctx


def _pinned_context(server: bool, own: LaneCert, peer_der: bytes) -> ssl.SSLContext:
    """TLS 1.3 only, our certificate, and the peer's certificate as the one and only trust anchor."""
    ctx = _tls_base(server)
    _load_cert_chain(ctx, own)
    ctx.load_verify_locations(cadata=peer_der)
    return ctx


# ============================================================================================ wire fields


@dataclass(frozen=True)
class LaneOffer:
    """What the receiver's Accept carries (`accept.lane`): where to connect and what to expect there."""

    port: int
    lane_id: str  # TLS SNI: selects this transfer's context on the receiver (not secret)
    token: bytes  # one-time, secret: known only to the two peers of the negotiation
    cert: bytes  # the receiver's certificate (DER) for this transfer; the sender pins it

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def to_wire(self) -> dict[str, Any]:
        return {"v": LANE_VERSION, "port": self.port, "id": self.lane_id, "token": self.token, "cert": self.cert}

    @classmethod
    def from_wire(cls, f: wire.Fields) -> LaneOffer:
        lane_id = f.str("id", 64)
        if not _LANE_ID_RE.match(lane_id):  # it becomes a TLS SNI label: keep it short and plain
            raise wire.WireError(f"{f.where}.id must be {LANE_ID_PREFIX}<32 hex>", "malformed")
        token = f.bytes("token", 32)
        if len(token) != 32:
            raise wire.WireError(f"{f.where}.token must be 32 bytes", "malformed")
        return cls(f.int("port", 1, 65535), lane_id, token, check_cert(f.raw("cert"), f"{f.where}.cert"))


def propose_field(cert: LaneCert) -> dict[str, Any]:
    """What the sender's Propose carries (`propose.lane`): its certificate for this transfer."""
    return {"v": LANE_VERSION, "cert": cert.der}


def decode_propose_field(f: wire.Fields) -> bytes:
    """The sender's certificate (DER) from `propose.lane`; WireError if malformed."""
    return check_cert(f.raw("cert"), f"{f.where}.cert")


# ============================================================================================ blocking I/O


class _Conn:
    """A blocking socket (TLS, or plain for the benchmark's baseline) with exact reads and frames.
    Used only from worker threads; every call has a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_in = 0
        self.bytes_out = 0

    def recv_into(self, mv: memoryview, timeout: float) -> None:
        """Fill `mv` completely or raise (EOF -> WireError truncated, silence -> TimeoutError)."""
        self.sock.settimeout(timeout)
        got, n = 0, len(mv)
        while got < n:
            k = self.sock.recv_into(mv[got:], n - got)
            if not k:
                raise wire.WireError("lane closed by the peer", "truncated")
            got += k
        self.bytes_in += n

    def recv_some_into(self, mv: memoryview, timeout: float, fill_s: float) -> int:
        """Read at least one byte into `mv` (silence -> TimeoutError, EOF -> WireError truncated) and keep
        filling it while bytes keep coming for up to `fill_s`: a fast sender's bytes arrive in whole chunks
        (TLS records are 16 KiB), a slow one's still reach the caller's rate check every `fill_s`."""
        self.sock.settimeout(timeout)
        got, n = 0, len(mv)
        start = time.monotonic()
        while got < n:
            k = self.sock.recv_into(mv[got:], n - got)
            if not k:
                if got:
                    break  # the next call reports the end
                raise wire.WireError("lane closed by the peer", "truncated")
            got += k
            self.bytes_in += k
            if time.monotonic() - start >= fill_s:
                break
        return got

    def read_exact(self, n: int, timeout: float) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf), timeout)
        return bytes(buf)

    def read_frame(self, limit: int, timeout: float) -> tuple[str, wire.Fields]:
        (length,) = wire.HEADER.unpack(self.read_exact(4, timeout))
        if length > limit:
            raise wire.WireError(f"frame of {length} bytes exceeds the {limit}-byte limit", "oversize")
        return wire.decode_message(self.read_exact(length, timeout), limit)

    def send(self, data: bytes | memoryview, timeout: float = SEND_TIMEOUT_S) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)
        self.bytes_out += len(data)

    def shutdown(self) -> None:
        """Wake any thread blocked on this socket (close() alone does not on Linux)."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the raw fd, bypassing SSLSocket state
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


async def _in_thread(fn: Callable[[], _T], conn: _Conn | None) -> _T:
    """Run blocking `fn` in a worker thread; if we are cancelled, shut the socket so it returns soon."""
    finished = threading.Event()

    def run() -> _T:
        try:
            return fn()
        finally:
            finished.set()

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException:
        if not finished.is_set():
            if conn is not None:
                conn.shutdown()
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                while not finished.is_set():
                    await trio.sleep(0.01)
        raise


class _Verifier:
    """Commits a finished layer in a second thread while the next one streams in.

    Why: fsync, the second sha256 and the finite-value check cost about as much as receiving; done in line
    they stall the socket. Depth one: a layer is handed over only after the previous one has passed, so at
    most one layer is in verification and a failure stops the transfer one layer later at the latest."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, layer: FinishedLayer) -> None:
        try:
            layer.commit()
        except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the layer in verification is committed; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, layer: FinishedLayer) -> None:
        """Start committing `layer`; call wait() first (the previous layer must have passed)."""
        if self._thread is not None:
            raise RuntimeError("wait() for the layer in verification first")
        self._thread = threading.Thread(target=self._run, args=(layer,), name="lane-verify", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """On the way out after an error: let the layer in verification finish (it was complete)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _recv_layers_blocking(conn: _Conn, incoming: transfer.Incoming, schema: Mapping[str, bundle_mod.LayerEntry],
                          store: LayerStore, faults: Faults | None, ctx: Mapping[str, Any],
                          progress: Callable[[int], None] | None) -> int:
    """transfer.receive_layers in one worker thread (plus the verifier): the same layer sink, so the same
    checks, errors, partial files, resume offsets and minimum rate; it returns only when every received
    layer is verified and in the store."""
    buf = bytearray(READ_CHUNK)
    mv = memoryview(buf)
    sink = LayerSink(incoming.send, schema, store, faults=faults, ctx=ctx, on_progress=progress)
    verifier = _Verifier()
    try:
        while sink.next_layer() is not None:
            while n := sink.want():
                try:
                    k = conn.recv_some_into(mv[:n], wire.READ_TIMEOUT_S, FILL_S)
                except TimeoutError:
                    raise transfer.TransferError(f"no lane data for {wire.READ_TIMEOUT_S:g} s", "timeout") from None
                except wire.WireError as exc:
                    raise transfer.TransferError(str(exc), exc.kind) from None
                except OSError as exc:
                    raise transfer.TransferError(f"lane broke: {exc}", "broken") from None
                sink.feed(mv[:k])
            verifier.wait()  # if the previous layer failed, the sink settles this one (complete) on the way out
            verifier.submit(sink.complete())
        verifier.wait()
    finally:
        verifier.drain()
        sink.close()
    return sink.received


class _Progress:
    """Report progress from a worker thread to the trio side at most every `every_s` seconds."""

    def __init__(self, fn: Callable[[int], None] | None, every_s: float = 0.25) -> None:
        self.fn = fn
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, n: int) -> None:
        now = time.monotonic()
        if self.fn is not None and now - self.last >= self.every_s:
            self.last = now
            trio.from_thread.run_sync(self.fn, n)

    def done(self, n: int) -> None:
        if self.fn is not None:
            self.fn(n)


# ============================================================================================ receiver


class LaneIO:
    """StreamIO's interface over an authenticated lane connection, so the bundle handler that serves
    `/snake/bundle/1.0.0` serves the lane unchanged. `peer` is the peer id the offer was made to (the peer
    the Noise-authenticated negotiation ran with), not anything the connection claims."""

    def __init__(self, conn: _Conn, counters: Counters, peer: str, name: str = "lane") -> None:
        self.conn = conn
        self.counters = counters
        self.peer = peer
        self.name = name

    @property
    def bytes_in(self) -> int:
        return self.conn.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.conn.bytes_out

    async def _io(self, fn: Callable[[], _T]) -> _T:
        before_in, before_out = self.conn.bytes_in, self.conn.bytes_out
        try:
            return await _in_thread(fn, self.conn)
        except TimeoutError:
            raise trio.TooSlowError from None
        except OSError as exc:
            raise wire.WireError(f"lane broke: {exc}", "truncated") from None
        finally:
            self.counters.add(f"bytes.{self.name}.in", self.conn.bytes_in - before_in)
            self.counters.add(f"bytes.{self.name}.out", self.conn.bytes_out - before_out)

    async def read_exact(self, n: int, timeout: float = wire.READ_TIMEOUT_S) -> bytes:
        return await self._io(lambda: self.conn.read_exact(n, timeout))

    async def read_some(self, max_n: int, timeout: float = wire.READ_TIMEOUT_S) -> bytes:
        def recv() -> bytes:
            self.conn.sock.settimeout(timeout)
            data = self.conn.sock.recv(max_n)
            if not data:
                raise wire.WireError("lane closed by the peer", "truncated")
            self.conn.bytes_in += len(data)
            return data

        return await self._io(recv)

    async def read_frame(self, limit: int = wire.MAX_FRAME, timeout: float = wire.READ_TIMEOUT_S
                         ) -> tuple[str, wire.Fields]:
        return await self._io(lambda: self.conn.read_frame(limit, timeout))

    async def write(self, data: bytes) -> None:
        await self._io(lambda: self.conn.send(data))

    async def write_frame(self, obj: dict[str, Any]) -> None:
        await self.write(wire.frame(obj))

    async def receive_layers(self, incoming: transfer.Incoming, schema: Mapping[str, bundle_mod.LayerEntry],
                             store: LayerStore, *, faults: Faults | None = None,
                             ctx: Mapping[str, Any] | None = None,
                             on_progress: Callable[[int], None] | None = None) -> int:
        progress = _Progress(on_progress)
        before = self.conn.bytes_in
        try:
            n = await _in_thread(lambda: _recv_layers_blocking(self.conn, incoming, schema, store, faults,
                                                               dict(ctx or {}), progress), self.conn)
        finally:
            self.counters.add(f"bytes.{self.name}.in", self.conn.bytes_in - before)
        progress.done(n)
        return n

    async def close(self) -> None:
        self.conn.close()

    async def reset(self) -> None:
        self.conn.shutdown()
        await self.close()


async def receive_layers(io: StreamIO | LaneIO, incoming: transfer.Incoming,
                         schema: Mapping[str, bundle_mod.LayerEntry], store: LayerStore, *,
                         faults: Faults | None = None, ctx: Mapping[str, Any] | None = None,
                         on_progress: Callable[[int], None] | None = None) -> int:
    """transfer.receive_layers for either kind of stream: the lane's runs its whole loop in one thread."""
    if isinstance(io, LaneIO):
        return await io.receive_layers(incoming, schema, store, faults=faults, ctx=ctx, on_progress=on_progress)
    return await transfer.receive_layers(io, incoming, schema, store, faults=faults, ctx=ctx,
                                         on_progress=on_progress)


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
        ctx = None if self.plaintext else _pinned_context(True, own, peer_cert)
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
        ctx = _tls_base(True)

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

    def _authenticate(self, guard: _Conn) -> _Expected:
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

    def _hello(self, conn: _Conn, exp_tls: _Expected | None, left: Callable[[], float]) -> _Expected:
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
        conn: _Conn | None = None
        try:
            raw = socket.socket(fileno=tsock.detach())
            raw.setblocking(True)
            conn = _Conn(raw)
            try:
                exp = await _in_thread(lambda: self._authenticate(conn), conn)
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
                    await _in_thread(lambda: _tell_and_drain(io.conn, kind, message), io.conn)
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


def _tell_and_drain(conn: _Conn, kind: str, message: str) -> None:
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


# ============================================================================================ sender


def remote_host(io: StreamIO) -> str | None:
    """The IP address of the peer's current libp2p connection: the address the lane should dial."""
    try:
        addr = io.stream.get_remote_address()
    except Exception:  # noqa: BLE001 - not every transport knows it
        return None
    return addr[0] if addr else None


def _connect_blocking(hosts: list[str], offer: LaneOffer, cert: LaneCert | None, timeout: float) -> _Conn:
    """TCP connect, TLS 1.3 with both certificates pinned, hello, and wait for `lane_ok`.
    Everything here raises LaneUnavailable: no bundle byte has moved yet."""
    raw: socket.socket | None = None
    errors = []
    for h in (h for h in hosts if h):
        try:
            raw = socket.create_connection((h, offer.port), timeout=timeout)
            break
        except OSError as exc:
            errors.append(f"{h}:{offer.port}: {exc.strerror or exc}")
    if raw is None:
        raise LaneUnavailable("cannot connect: " + ("; ".join(errors) or "no address to dial"), "connect")
    conn = _Conn(raw)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cert is not None:
            ctx = _pinned_context(False, cert, offer.cert)
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                tls = ctx.wrap_socket(raw, server_hostname=offer.lane_id)
            except ssl.SSLCertVerificationError as exc:
                raise LaneUnavailable(f"the lane presented another certificate than the one negotiated ({exc})",
                                      "pin_mismatch") from None
            except (ssl.SSLError, OSError) as exc:
                raise LaneUnavailable(f"TLS handshake failed: {exc}", "handshake") from None
            der = tls.getpeercert(binary_form=True)
            if tls.version() != "TLSv1.3" or not der or not hmac.compare_digest(fingerprint(der),
                                                                                offer.fingerprint):
                tls.close()
                raise LaneUnavailable("the lane's certificate is not the one pinned in the Accept", "pin_mismatch")
            conn = _Conn(tls)
        try:
            conn.send(wire.frame({"t": "lane_hello", "v": LANE_VERSION, "id": offer.lane_id,
                                  "token": offer.token}), HANDSHAKE_TIMEOUT_S)
            kind, f = conn.read_frame(64 * 1024, HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, wire.WireError) as exc:
            # TLS 1.3: the server checks our certificate after our handshake ends; a refusal shows up here.
            raise LaneUnavailable(f"the receiver closed the lane before accepting it ({exc})", "refused") from None
        if kind == "error":
            raise LaneUnavailable(f"the receiver refused the lane: {f.str('error', 1000, required=False)}",
                                  f.str("kind", 64, required=False) or "refused")
        if kind != "lane_ok":
            raise LaneUnavailable(f"expected lane_ok, got {kind!r}", "unexpected")
        return conn
    except BaseException:
        conn.close()
        raw.close()
        raise


def _send_blocking(conn: _Conn, manifest: bundle_mod.LayerBundle, store: LayerStore,
                   items: list[transfer.SendItem], rate: float | None, faults: Faults | None,
                   ctx: Mapping[str, Any], progress: Callable[[int], None] | None) -> int:
    """transfer.send_bundle's bytes on the lane: the same frame, the same layer bytes in 1 MiB writes."""
    conn.send(wire.frame({
        "t": "bundle",
        "manifest": manifest.encode(),
        "send": [{"name": it.entry.name, "hash": it.entry.hash, "offset": it.offset} for it in items],
    }))
    buf = bytearray(transfer.CHUNK)
    mv = memoryview(buf)
    t0 = time.monotonic()
    sent = 0
    for it in items:
        with open(store.path(it.entry.hash), "rb", buffering=0) as fh:
            fh.seek(it.offset)
            remaining = it.entry.size - it.offset
            while remaining > 0:
                n = fh.readinto(mv[:min(transfer.CHUNK, remaining)])
                if not n:
                    raise transfer.TransferError(f"layer {it.entry.name} is shorter on disk than its size",
                                                 "store_corrupt")
                conn.send(mv[:n])
                remaining -= n
                sent += n
                if progress is not None:
                    progress(sent)
                if faults is not None and faults.check("send", bytes=sent, **ctx) == "break":
                    conn.shutdown()  # as transfer.py's stream reset: the receiver keeps a partial to resume
                    raise transfer.TransferError(f"lane broken on purpose after {sent} bytes (--test-faults)",
                                                 "test_fault")
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
    return sent


def _read_reply(conn: _Conn, timeout: float) -> tuple[str, wire.Fields]:
    try:
        return conn.read_frame(wire.MAX_FRAME, timeout)
    except TimeoutError:
        raise transfer.TransferError(f"no ack from the receiver within {timeout:g} s", "timeout") from None
    except (wire.WireError, OSError) as exc:
        raise transfer.TransferError(f"the lane broke before the ack ({exc})", "broken") from None


def _send_and_ack(conn: _Conn, manifest: bundle_mod.LayerBundle, store: LayerStore,
                  items: list[transfer.SendItem], rate: float | None, faults: Faults | None,
                  ctx: Mapping[str, Any], progress: Callable[[int], None] | None) -> tuple[int, str, wire.Fields]:
    try:
        sent = _send_blocking(conn, manifest, store, items, rate, faults, ctx, progress)
    except OSError as exc:
        # The receiver may have refused mid-stream: its error frame says why. Otherwise the lane broke;
        # the caller re-proposes and the new Accept's `partial` offsets make the next attempt resume.
        try:
            kind, f = conn.read_frame(wire.MAX_FRAME, 2.0)
        except (OSError, wire.WireError):
            kind, f = "", wire.Fields({}, "none")
        if kind == "error":
            raise transfer.TransferError(f"receiver refused the bundle: {f.str('error', 1000, required=False)}",
                                         f.str("kind", 64, required=False) or "refused") from None
        raise transfer.TransferError(f"the lane broke while sending ({exc})", "broken") from None
    kind, f = _read_reply(conn, transfer.ACK_TIMEOUT_S)
    return sent, kind, f


async def send_over_lane(hosts: list[str], offer: LaneOffer, cert: LaneCert,
                         manifest: bundle_mod.LayerBundle, store: LayerStore, items: list[transfer.SendItem], *,
                         counters: Counters, fallback: Callable[[], Awaitable[StreamIO]] | None = None,
                         peer: str = "?", rate: float | None = None, faults: Faults | None = None,
                         ctx: Mapping[str, Any] | None = None, on_progress: Callable[[int], None] | None = None,
                         connect_timeout: float = CONNECT_TIMEOUT_S, plaintext_for_benchmark: bool = False,
                         ) -> dict[str, Any]:
    """transfer.send_bundle over the lane described by the receiver's Accept.

    `hosts`: addresses to dial (normally `[remote_host(negotiate_io)]`), `cert`: the certificate whose DER
    went into our Propose. If the lane cannot be set up (connect refused or timed out, TLS failure, pin
    mismatch, offer refused) and `fallback` is given, logs `lane_fallback`, counts
    `lane.fallback.<reason>`, opens the libp2p bundle stream with `fallback()` and sends there. Once bundle
    bytes have moved on the lane, a failure raises TransferError (re-propose: the receiver's partial files
    make the next attempt resume). Returns {"bytes", "seconds", "path": "lane"|"libp2p"}, plus "fallback":
    the reason when it fell back.
    """
    t0 = time.monotonic()
    ctx_d = dict(ctx or {})
    try:
        conn = await _in_thread(
            lambda: _connect_blocking(hosts, offer, None if plaintext_for_benchmark else cert, connect_timeout),
            None)
    except LaneUnavailable as exc:
        counters.add(f"lane.fallback.{exc.kind}")
        if fallback is None:
            raise transfer.TransferError(f"the bulk lane is unavailable: {exc}", exc.kind) from None
        log.warning("lane_fallback", peer=peer, reason=exc.kind, error=str(exc)[:300],
                    to="libp2p " + wire.PROTO_BUNDLE)
        io = await fallback()
        try:
            res = await transfer.send_bundle(io, manifest, store, items, rate=rate, faults=faults, ctx=ctx,
                                             on_progress=on_progress)
        finally:
            await io.close()
        return {**res, "path": "libp2p", "fallback": exc.kind}
    progress = _Progress(on_progress)
    try:
        sent, kind, f = await _in_thread(
            lambda: _send_and_ack(conn, manifest, store, items, rate, faults, ctx_d, progress), conn)
    finally:
        counters.add("bytes.lane.out", conn.bytes_out)
        counters.add("bytes.lane.in", conn.bytes_in)
        await _in_thread(conn.close, None)
    if kind == "error":
        raise transfer.TransferError(f"receiver refused the bundle: {f.str('error', 1000, required=False)}",
                                     f.str("kind", 64, required=False) or "refused")
    if kind != "ack":
        raise transfer.TransferError(f"expected ack, got {kind!r}", "unexpected")
    progress.done(sent)
    return {"bytes": sent, "seconds": time.monotonic() - t0, "path": "lane"}
