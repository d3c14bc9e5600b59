"""The sending end of a lane: dial, TLS with the receiver's pinned certificate, hello, then the bundle
exactly as on `/snake/bundle/1.0.0`; falls back to the libp2p stream when the lane cannot be set up."""

from __future__ import annotations

import hmac
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from snakenode import logs, wire
from snakenode.counters import Counters
from snakenode.faults import Faults
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore
from snakenode.net import transfer
from snakenode.net.host import StreamIO
from snakenode.net.lane.conn import Conn, LaneUnavailable, Progress, in_thread
from snakenode.net.lane.offer import LANE_VERSION, LaneCert, LaneOffer, fingerprint
from snakenode.net.lane.tls import HANDSHAKE_TIMEOUT_S, pinned_context

log = logs.get("lane")

CONNECT_TIMEOUT_S = 5.0


def remote_host(io: StreamIO) -> str | None:
    """The IP address of the peer's current libp2p connection: the address the lane should dial."""
    try:
        addr = io.stream.get_remote_address()
    except Exception:  # noqa: BLE001 - not every transport knows it
        return None
    return addr[0] if addr else None


def connect_blocking(hosts: list[str], offer: LaneOffer, cert: LaneCert | None, timeout: float) -> Conn:
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
    conn = Conn(raw)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cert is not None:
            ctx = pinned_context(False, cert, offer.cert)
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
            conn = Conn(tls)
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


def _send_blocking(conn: Conn, manifest: bundle_mod.LayerBundle, store: LayerStore,
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


def _read_reply(conn: Conn, timeout: float) -> tuple[str, wire.Fields]:
    try:
        return conn.read_frame(wire.MAX_FRAME, timeout)
    except TimeoutError:
        raise transfer.TransferError(f"no ack from the receiver within {timeout:g} s", "timeout") from None
    except (wire.WireError, OSError) as exc:
        raise transfer.TransferError(f"the lane broke before the ack ({exc})", "broken") from None


def _send_and_ack(conn: Conn, manifest: bundle_mod.LayerBundle, store: LayerStore,
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
        conn = await in_thread(
            lambda: connect_blocking(hosts, offer, None if plaintext_for_benchmark else cert, connect_timeout),
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
    progress = Progress(on_progress)
    try:
        sent, kind, f = await in_thread(
            lambda: _send_and_ack(conn, manifest, store, items, rate, faults, ctx_d, progress), conn)
    finally:
        counters.add("bytes.lane.out", conn.bytes_out)
        counters.add("bytes.lane.in", conn.bytes_in)
        await in_thread(conn.close, None)
    if kind == "error":
        raise transfer.TransferError(f"receiver refused the bundle: {f.str('error', 1000, required=False)}",
                                     f.str("kind", 64, required=False) or "refused")
    if kind != "ack":
        raise transfer.TransferError(f"expected ack, got {kind!r}", "unexpected")
    progress.done(sent)
    return {"bytes": sent, "seconds": time.monotonic() - t0, "path": "lane"}
