"""Everything that crosses a socket: protocol ids, framing, strict msgpack decoding with size limits.

One frame is a 4-byte big-endian length followed by that many bytes of msgpack (a map with a `t` key
naming the message). Each message kind has a size limit; a longer frame is refused before it is read.
Decoding never builds anything but plain maps, lists, strings, bytes and numbers (msgpack ext types are
refused), and every field is checked for type and range by the `Fields` reader, so a malformed message
becomes a `WireError` naming the field — never a crash. No pickle, ever.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

import msgpack

# --- protocol ids (docs/PROTOCOL.md lists each with its messages) ------------------------------------
PROTO_NEGOTIATE = "/snake/negotiate/1.0.0"
PROTO_BUNDLE = "/snake/bundle/1.0.0"
PROTO_CS = "/snake/cs/1.0.0"
PROTO_STATE = "/snake/state/1.0.0"  # job-state queries: resume, baton reports, fetch
PROTO_PEERS = "/snake/peers/1.0.0"  # peer exchange: swap profiles on connect, list live peers
PROTO_PING = "/ipfs/ping/1.0.0"  # the standard libp2p ping, used on a long-lived stream per peer
SNAKE_PROTOCOLS = (PROTO_NEGOTIATE, PROTO_BUNDLE, PROTO_CS, PROTO_STATE, PROTO_PEERS)
PROTOCOL_RE = re.compile(r"^/snake/[a-z][a-z0-9-]*/\d+\.\d+\.\d+$")


def topic(network: str, name: str) -> str:
    """Gossip topic for a network: snake/<net>/<name>/1."""
    return f"snake/{network}/{name}/1"


TOPIC_NAMES = ("profiles", "jobs", "progress")

# --- limits -------------------------------------------------------------------------------------------
HEADER = struct.Struct(">I")
MAX_FRAME = 4 * 2**20  # no control message is larger than this; bundle payload bytes are not framed
GOSSIP_MAX = 64 * 2**10  # profiles, job announcements and progress are small by design
READ_TIMEOUT_S = 10.0  # any single read on a stream: a slow or silent peer is cut off after this


class WireError(Exception):
    """A message that is malformed, oversized or of the wrong shape. `kind` is the counter name."""

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed", "malformed")


def packb(obj: Any) -> bytes:
    """Canonical msgpack: maps with sorted keys so equal objects give equal bytes (hashes, signatures)."""
    return msgpack.packb(_sorted(obj), use_bin_type=True)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def unpackb(data: bytes, limit: int = MAX_FRAME) -> Any:
    if len(data) > limit:
        raise WireError(f"message of {len(data)} bytes exceeds the {limit}-byte limit", "oversize")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=100_000,
            max_map_len=100_000,
        )
    except WireError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise WireError(f"undecodable msgpack: {type(exc).__name__}: {exc}", "malformed") from None


def frame(obj: dict[str, Any]) -> bytes:
    payload = packb(obj)
    if len(payload) > MAX_FRAME:
        raise WireError(f"refusing to send a {len(payload)}-byte frame (limit {MAX_FRAME})", "oversize")
    return HEADER.pack(len(payload)) + payload


def decode_message(data: bytes, limit: int = MAX_FRAME) -> tuple[str, Fields]:
    obj = unpackb(data, limit)
    if not isinstance(obj, dict):
        raise WireError("message is not a map", "malformed")
    f = Fields(obj, "message")
    return f.str("t", max_len=32), f


class Fields:
    """Typed, range-checked access to a decoded map. Every accessor raises WireError naming the field."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise WireError(f"{where} must be a map", "malformed")
        self.obj = obj
        self.where = where

    def _get(self, key: str, default: Any, required: bool) -> Any:
        if key in self.obj and self.obj[key] is not None:
            return self.obj[key]
        if required:
            raise WireError(f"{self.where}.{key} is missing", "malformed")
        return default

    def _bad(self, key: str, what: str) -> WireError:
        return WireError(f"{self.where}.{key} must be {what}", "malformed")

    def str(self, key: str, max_len: int = 256, required: bool = True, default: str = "",
            pattern: re.Pattern[str] | None = None) -> str:
        v = self._get(key, default, required)
        if not isinstance(v, str) or len(v) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        if pattern is not None and v and not pattern.match(v):
            raise self._bad(key, f"a string matching {pattern.pattern}")
        return v

    def bytes(self, key: str, max_len: int = 1024, required: bool = True, default: bytes = b"") -> bytes:
        v = self._get(key, default, required)
        if not isinstance(v, bytes) or len(v) > max_len:
            raise self._bad(key, f"bytes of at most {max_len}")
        return v

    def int(self, key: str, lo: int = 0, hi: int = 2**62, required: bool = True, default: int = 0) -> int:
        v = self._get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self._bad(key, f"an integer in [{lo}, {hi}]")
        return v

    def float(self, key: str, lo: float = -math.inf, hi: float = math.inf, required: bool = True,
              default: float = 0.0) -> float:
        v = self._get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._bad(key, "a number")
        v = float(v)
        if not math.isfinite(v) or not lo <= v <= hi:
            raise self._bad(key, f"a finite number in [{lo}, {hi}]")
        return v

    def bool(self, key: str, required: bool = True, default: bool = False) -> bool:
        v = self._get(key, default, required)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def choice(self, key: str, choices: tuple[str, ...], required: bool = True, default: str = "") -> str:
        v = self._get(key, default, required)
        if v not in choices:
            raise self._bad(key, "one of " + ", ".join(choices))
        return v

    def str_list(self, key: str, max_items: int = 1024, max_len: int = 256, required: bool = True,
                 pattern: re.Pattern[str] | None = None) -> list[str]:
        v = self._get(key, [], required)
        if not isinstance(v, list) or len(v) > max_items:
            raise self._bad(key, f"a list of at most {max_items} strings")
        for item in v:
            if not isinstance(item, str) or len(item) > max_len or (pattern and not pattern.match(item)):
                raise self._bad(key, f"a list of strings of at most {max_len} characters")
        return v

    def int_list(self, key: str, max_items: int = 100_000, lo: int = 0, hi: int = 2**62,
                 required: bool = True) -> list[int]:
        v = self._get(key, [], required)
        if not isinstance(v, list) or len(v) > max_items:
            raise self._bad(key, f"a list of at most {max_items} integers")
        for item in v:
            if isinstance(item, bool) or not isinstance(item, int) or not lo <= item <= hi:
                raise self._bad(key, f"a list of integers in [{lo}, {hi}]")
        return v

    def map(self, key: str, required: bool = True) -> Fields:
        v = self._get(key, {}, required)
        return Fields(v, f"{self.where}.{key}")

    def raw(self, key: str, required: bool = True, default: Any = None) -> Any:
        return self._get(key, default, required)

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None


PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,64}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
JOB_ID_RE = re.compile(r"^[0-9a-f]{16}$")
