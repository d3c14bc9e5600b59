"""What the negotiation carries for the lane: per-transfer certificates and the offer codec.

This is all that the snake's message codecs (snakenode/snake/messages.py) need of the lane, so it imports
neither the lane's sockets nor libp2p. Why certificates are fresh per transfer and pinned by their SHA-256:
docs/PROTOCOL.md, "Fast bulk lane".
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from snakenode import wire

LANE_VERSION = 1
MAX_CERT_BYTES = 4096
LANE_ID_PREFIX = "lane-"
_LANE_ID_RE = re.compile(r"^lane-[0-9a-f]{32}$")


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, lowercase hex: what each side pins."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class LaneCert:
    """A per-transfer self-signed ECDSA P-256 certificate and its private key (which never leaves memory:
    tls.py hands it to OpenSSL through an anonymous memfd where the platform has one)."""

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
