"""The names of the states a node's share of a job goes through, as enums (they are written to checkpoints,
logs and the lease message as their plain string values, so the files and the wire are unchanged).

A node's `JobRun.phase` for one job: `idle` -> `reserved` (it accepted a proposal) -> `receiving` (the
bundle arrives) -> `received` -> `training` -> `trained` -> `handing_off` -> `baton` (it keeps the
previous model while its successor holds the hop) -> `idle` once released; `done` when the job completed
here; `superseded` when a later claim won; `waiting` when a CS node cannot reach its coordinator.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    IDLE = "idle"
    RESERVED = "reserved"
    RECEIVING = "receiving"
    RECEIVED = "received"
    TRAINING = "training"
    TRAINED = "trained"
    HANDING_OFF = "handing_off"
    BATON = "baton"
    DONE = "done"
    SUPERSEDED = "superseded"
    WAITING = "waiting"

    @classmethod
    def parse(cls, text: object) -> Phase:
        """A phase read back from a checkpoint; an unknown name (a newer or damaged file) counts as idle."""
        try:
            return cls(str(text))
        except ValueError:
            return cls.IDLE


# The phases in which this node holds a hop (and so renews its lease and can be superseded).
HOLDING = frozenset({Phase.RECEIVED, Phase.TRAINING, Phase.TRAINED, Phase.HANDING_OFF})


class BatonEnd(StrEnum):
    """How the predecessor's watch over a baton ends (the last two are logged as the `why` of a retry)."""

    RELEASED = "released"
    SUPERSEDED = "superseded"
    LEASE = "lease"  # the successor stopped renewing its lease
    DISCONNECT = "disconnect"  # the successor left the peer table


class NodeState(StrEnum):
    """The `state.kind` of this node's profile (advisory: routing treats every candidate as idle)."""

    IDLE = "idle"
    RESERVED = "reserved"
    RECEIVING = "receiving"
    TRAINING = "training"
    SENDING = "sending"
    WAITING = "waiting"


class Verdict(StrEnum):
    """A predecessor's answer to `resume_query` (a restarted holder asks whether its hop is still its own)."""

    RESUME = "resume"
    SUPERSEDED = "superseded"
    UNKNOWN = "unknown"
