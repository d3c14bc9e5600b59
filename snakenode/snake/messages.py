"""Snake protocol messages: negotiation, leases and state queries, progress and job gossip (codecs only).

Each decoder takes a `wire.Fields` (already size-limited msgpack) and returns plain typed values, or
raises WireError naming the field. docs/PROTOCOL.md documents every message here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snakenode import wire
from snakenode.net.lane import offer as lane_mod
from snakenode.snake.custody import CustodyError, Link
from snakenode.snake.state import JobState, StateError

DECLINE_REASONS = (
    "busy",            # training or reserved for another hop
    "memory",          # not even window.min_blocks fits the node's memory budget
    "time",            # not even window.min_blocks fits window.hop_time_s
    "not_joined",      # the node has no matching data for the job
    "untrusted",       # the job's submitter is not trusted here
    "bad_job",         # the signed job does not verify
    "stale",           # a later (hop, attempt) or a winning lineage is known
    "not_ready",       # the node is still preparing the job (model init)
    "not_coordinator", # CS mode: the proposer is not the job's coordinator
    "poison_suspect",  # the incoming model failed the poisoning guard
    "custody",         # the proposer cannot show it was handed the hop before (snake/custody.py)
    "test_fault",      # injected by --test-faults
    "error",           # anything else; detail says what
)
MAX_HELD = 100_000
MAX_LAYERS = 4096
STATE_LIMIT = 1 * 2**20


def _state(f: wire.Fields, key: str = "state") -> JobState:
    raw = f.raw(key)
    try:
        return JobState.from_dict(raw)
    except (StateError, ValueError, TypeError, KeyError) as exc:
        raise wire.WireError(f"{f.where}.{key}: {exc}", "bad_state") from None


def _hash_map(f: wire.Fields, key: str, values: str = "hash") -> dict[str, Any]:
    raw = f.raw(key, required=False, default={})
    if not isinstance(raw, dict) or len(raw) > MAX_LAYERS:
        raise wire.WireError(f"{f.where}.{key} must be a map of at most {MAX_LAYERS} entries", "malformed")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if values == "hash":
            if not isinstance(k, str) or len(k) > 256 or not isinstance(v, str) or not wire.HEX64_RE.match(v):
                raise wire.WireError(f"{f.where}.{key} must map layer names to sha256 hex", "malformed")
        else:  # hash -> offset
            if (not isinstance(k, str) or not wire.HEX64_RE.match(k) or isinstance(v, bool)
                    or not isinstance(v, int) or v < 0):
                raise wire.WireError(f"{f.where}.{key} must map sha256 hex to byte offsets", "malformed")
        out[k] = v
    return out


def _lane_field(f: wire.Fields) -> wire.Fields | None:
    """The optional `lane` map of propose/accept (the fast bulk lane, docs/PROTOCOL.md). A version this node
    does not speak counts as absent: the bundle then goes over libp2p."""
    if not f.has("lane"):
        return None
    g = wire.Fields(f.raw("lane"), f"{f.where}.lane")
    return g if g.int("v", 0, 2**31) == lane_mod.LANE_VERSION else None


def decode_lane_cert(f: wire.Fields) -> bytes | None:
    """The sender's per-transfer lane certificate (DER) of `propose.lane` / `upload.lane`; None = no lane."""
    g = _lane_field(f)
    return None if g is None else lane_mod.decode_propose_field(g)


def decode_lane_offer(f: wire.Fields) -> lane_mod.LaneOffer | None:
    """The receiver's lane offer of `accept.lane` / `upload_ok.lane`; None = no lane (libp2p)."""
    g = _lane_field(f)
    return None if g is None else lane_mod.LaneOffer.from_wire(g)


def decode_links(f: wire.Fields, key: str, limit: int) -> list[Link]:
    """A list of custody links (snake/custody.py), parent first; absent = empty (the receiver then declines
    with `custody` where a chain is required)."""
    raw = f.raw(key, required=False, default=[])
    if not isinstance(raw, list) or len(raw) > limit:
        raise wire.WireError(f"{f.where}.{key} must be a list of at most {limit} custody links", "malformed")
    try:
        return [Link.from_wire(x) for x in raw]
    except CustodyError as exc:
        raise wire.WireError(f"{f.where}.{key}: {exc}", "malformed") from None


MAX_TAIL = 8  # custody links a propose or progress message may carry


# --- negotiate ---------------------------------------------------------------------------------------
@dataclass
class Propose:
    job_id: str
    job: bytes  # the signed job, so a node that missed the announcement can verify and join on the spot
    state: JobState
    suggested: int
    layers: dict[str, str]  # manifest summary: layer name -> hash of the model being handed over
    lane: bytes | None = None  # the sender's per-transfer lane certificate (DER); None = no lane
    custody: list[Link] = field(default_factory=list)  # the chain's tail, ending at state.lineage

    def to_wire(self) -> dict[str, Any]:
        out = {"t": "propose", "job_id": self.job_id, "job": self.job, "state": self.state.to_dict(),
               "suggested": self.suggested, "layers": self.layers,
               "custody": [link.to_wire() for link in self.custody]}
        if self.lane is not None:
            out["lane"] = {"v": lane_mod.LANE_VERSION, "cert": self.lane}
        return out

    @classmethod
    def from_wire(cls, f: wire.Fields) -> Propose:
        job_id = f.str("job_id", 16, pattern=wire.JOB_ID_RE)
        state = _state(f)
        if state.job_id != job_id:
            raise wire.WireError("propose.state is for another job", "malformed")
        return cls(job_id, f.bytes("job", 64 * 1024), state, f.int("suggested", 1, 100_000),
                   _hash_map(f, "layers"), decode_lane_cert(f), decode_links(f, "custody", MAX_TAIL))


@dataclass
class Accept:
    job_id: str
    hop: int
    attempt: int
    size: int
    held: list[str]
    partial: dict[str, int] = field(default_factory=dict)
    lane: lane_mod.LaneOffer | None = None  # where and how to send the bundle over the lane; None = libp2p

    def to_wire(self) -> dict[str, Any]:
        out = {"t": "accept", "job_id": self.job_id, "hop": self.hop, "attempt": self.attempt,
               "size": self.size, "held": self.held, "partial": self.partial}
        if self.lane is not None:
            out["lane"] = self.lane.to_wire()
        return out

    @classmethod
    def from_wire(cls, f: wire.Fields) -> Accept:
        held = f.raw("held")
        if not isinstance(held, list) or len(held) > MAX_HELD or not all(
                isinstance(h, str) and wire.HEX64_RE.match(h) for h in held):
            raise wire.WireError("accept.held must be a list of sha256 hex", "malformed")
        return cls(f.str("job_id", 16, pattern=wire.JOB_ID_RE), f.int("hop"), f.int("attempt"),
                   f.int("size", 1, 100_000), held, _hash_map(f, "partial", values="offset"),
                   decode_lane_offer(f))


@dataclass
class Decline:
    job_id: str
    reason: str
    detail: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"t": "decline", "job_id": self.job_id, "reason": self.reason, "detail": self.detail[:500]}

    @classmethod
    def from_wire(cls, f: wire.Fields) -> Decline:
        return cls(f.str("job_id", 16, pattern=wire.JOB_ID_RE), f.choice("reason", DECLINE_REASONS),
                   f.str("detail", 500, required=False))


# --- state protocol ------------------------------------------------------------------------------------
@dataclass
class ClaimRef:
    """(job, hop, attempt, lineage): the hop attempt a lease, release or resume query is about."""

    job_id: str
    hop: int
    attempt: int
    lineage: str

    def to_wire(self, t: str, **extra: Any) -> dict[str, Any]:
        return {"t": t, "job_id": self.job_id, "hop": self.hop, "attempt": self.attempt,
                "lineage": self.lineage, **extra}

    @classmethod
    def from_wire(cls, f: wire.Fields) -> ClaimRef:
        return cls(f.str("job_id", 16, pattern=wire.JOB_ID_RE), f.int("hop"), f.int("attempt"),
                   f.str("lineage", 64, pattern=wire.HEX64_RE))

    @classmethod
    def of(cls, state: JobState) -> ClaimRef:
        return cls(state.job_id, state.hop, state.attempt, state.lineage)


def decode_layer_list(f: wire.Fields, key: str = "hashes") -> list[str]:
    raw = f.raw(key)
    if not isinstance(raw, list) or len(raw) > MAX_LAYERS or not all(
            isinstance(h, str) and wire.HEX64_RE.match(h) for h in raw):
        raise wire.WireError(f"{f.where}.{key} must be a list of sha256 hex", "malformed")
    return raw


def decode_model_state(f: wire.Fields, key: str = "model") -> dict[str, str]:
    return _hash_map(f, key)
