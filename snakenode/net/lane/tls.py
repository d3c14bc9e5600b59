"""The lane's TLS 1.3 contexts: mutual authentication with each side's one pinned certificate as the only
trust anchor, no resumption, no compression (docs/PROTOCOL.md, "Fast bulk lane")."""

from __future__ import annotations

import os
import ssl
import tempfile

from snakenode.net.lane.offer import LaneCert

HANDSHAKE_TIMEOUT_S = 10.0  # TCP accept -> TLS handshake -> hello -> lane_ok, all of it


def load_cert_chain(ctx: ssl.SSLContext, cert: LaneCert) -> None:
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


def tls_base(server: bool) -> ssl.SSLContext:
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


def pinned_context(server: bool, own: LaneCert, peer_der: bytes) -> ssl.SSLContext:
    """TLS 1.3 only, our certificate, and the peer's certificate as the one and only trust anchor."""
    ctx = tls_base(server)
    load_cert_chain(ctx, own)
    ctx.load_verify_locations(cadata=peer_der)
    return ctx
