"""Node identity: one Ed25519 key per HOME, its libp2p peer id, and job signatures.

The key file holds the libp2p protobuf encoding of the private key (the format libp2p's own
`save_identity` writes), so other libp2p tools can read it. Peer ids are computed here without importing
libp2p: `snakenode id`, `submit` and signature checks must stay fast and light. Ed25519 peer ids embed the
public key (identity multihash), so a peer-id string is all a node needs to verify a signature; that is
why trust lists are plain peer-id strings.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_FILE = "identity.key"
# libp2p crypto.proto: KeyType Ed25519 = 1; field 1 = Type (varint), field 2 = Data (bytes, 32 here).
_PB_PREFIX = b"\x08\x01\x12\x20"
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class IdentityError(Exception):
    """A key file that is missing, unreadable, too open or corrupt. The message says what to do."""


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public(raw_public: bytes) -> str:
    """libp2p peer id of an Ed25519 public key: identity multihash of its protobuf encoding."""
    encoded = _PB_PREFIX + raw_public
    return b58encode(b"\x00" + bytes([len(encoded)]) + encoded)


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the Ed25519 key embedded in a peer id; raises ValueError for other key types."""
    try:
        raw = b58decode(peer_id)
    except ValueError as exc:
        raise ValueError(f"not a peer id: {peer_id!r} ({exc})") from None
    if len(raw) != 38 or raw[:2] != b"\x00\x24" or raw[2:6] != _PB_PREFIX:
        raise ValueError(f"not an Ed25519 peer id: {peer_id!r} (expected one starting with 12D3KooW)")
    return Ed25519PublicKey.from_public_bytes(raw[6:])


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` over `data` was made by the key behind `peer_id`."""
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    private: Ed25519PrivateKey

    @property
    def seed(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def libp2p_key_pair(self):  # noqa: ANN201 - libp2p type, imported lazily
        """The same key as a libp2p KeyPair (imports libp2p: call only in the daemon)."""
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.seed)


def key_path(home: Path) -> Path:
    return Path(home) / KEY_FILE


def load(home: Path) -> Identity:
    """Read HOME/identity.key, refusing files others can read (a leaked key impersonates the node)."""
    path = key_path(home)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"no identity in {home} (start a node once with `snakenode start --home {home}` to create one)"
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}` and start again"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}; check its owner and mode (600)") from None
    if len(data) != len(_PB_PREFIX) + 32 or not data.startswith(_PB_PREFIX):
        raise IdentityError(
            f"{path} is not an Ed25519 identity key (corrupt or another format); "
            f"move it away to create a new identity (the node gets a new peer id)"
        )
    return Identity(Ed25519PrivateKey.from_private_bytes(data[len(_PB_PREFIX):]))


def load_or_create(home: Path) -> Identity:
    """Load the node's key, creating it with mode 0600 on first start."""
    path = key_path(home)
    if path.exists() or path.is_symlink():
        return load(home)
    Path(home).mkdir(parents=True, exist_ok=True)
    ident = Identity(Ed25519PrivateKey.generate())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, _PB_PREFIX + ident.seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return ident
