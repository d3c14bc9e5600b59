"""What a hop's job asks of the trainer (`TrainConfig`) and the error the engine reports.

`EngineError.kind` is the error kind the worker RPC reports, so the daemon can tell a bad job from a
missing blob or a diverged run without parsing messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snakenode.train.frozen import FROZEN_DTYPES

OPTIMIZERS = ("sgd", "adam", "adamw")


class EngineError(Exception):
    """A request the engine cannot serve (bad arguments, missing blob, diverged training). `kind` is the
    error kind reported over the worker RPC."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    micro_batch: int = 0
    max_steps: int = 0
    frozen_dtype: str = "fp32"
    checkpoint_frozen: bool = False
    seq_len: int = 128

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> TrainConfig:
        t = job.get("train") or {}
        c = cls(int(t.get("epochs", 1)), int(t.get("batch", 32)), float(t.get("lr", 0.05)),
                str(t.get("optimizer", "sgd")), float(t.get("momentum", 0.9)), float(t.get("weight_decay", 0.0)),
                int(t.get("micro_batch", 0)), int(t.get("max_steps", 0)), str(t.get("frozen_dtype", "fp32")),
                bool(t.get("checkpoint_frozen", False)), int(t.get("seq_len", 128)))
        if c.optimizer not in OPTIMIZERS:
            raise EngineError("bad_job", f"train.optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
        if c.frozen_dtype not in FROZEN_DTYPES:
            raise EngineError("bad_job", f"train.frozen_dtype must be one of {FROZEN_DTYPES}, got {c.frozen_dtype!r}")
        if c.epochs < 0 or c.batch < 1 or c.micro_batch < 0 or c.seq_len < 2:
            raise EngineError("bad_job", "train.epochs >= 0, train.batch >= 1, train.micro_batch >= 0, "
                                         "train.seq_len >= 2 are required")
        return c

    @property
    def micro(self) -> int:
        return self.batch if self.micro_batch <= 0 else min(self.micro_batch, self.batch)

