"""Issue 7: the poisoning guard's decisions (snake/guard.py, measured by `receiver.poison_check`), without a
network.

The end-to-end tests drive the guard through real nodes (tests/test_snake_p2p.py: a poisoned hand-off is
refused and an honest non-IID job never trips it; tests/test_security_hostile.py: a hostile bundle is
refused as poison_suspect). The validation-loss bound only applies from the second lap on, after a first
model was accepted, which no short network test reaches on purpose; its decisions are pinned here with the
real method on stand-ins for the store and the worker.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from snakenode.layers import bundle as B
from snakenode.snake.job import JobSpecError, validate_spec
from snakenode.snake.receiver import poison_check


def _blob(scale: float) -> bytes:
    rng = np.random.default_rng(0)
    return B.encode_blob({"w": (rng.standard_normal((8, 4)) * scale).astype(np.float32),
                          "b": np.full(4, scale, dtype=np.float32)})


class _Store:
    def __init__(self, *blobs: bytes) -> None:
        self.blobs = {hashlib.sha256(b).hexdigest(): b for b in blobs}

    def has(self, h: str) -> bool:
        return h in self.blobs

    def get_bytes(self, h: str) -> bytes:
        return self.blobs[h]


def _h(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _evaluate(loss: float | Exception) -> Any:
    async def evaluate(run: Any, model: dict[str, str]) -> dict[str, Any]:
        if isinstance(loss, Exception):
            raise loss
        return {"loss": loss}

    return evaluate


def _run(held: dict[str, str], incoming_loss: float | None, **guard: Any) -> Any:
    g = {"enabled": True, "max_rel_change": 10.0, "val_loss_factor": 4.0, **guard}
    return SimpleNamespace(spec={"guard": g}, model=held, init_state=held, incoming_loss=incoming_loss,
                           job_id="0123456789abcdef")


OLD = _blob(1.0)


async def _check(new: bytes, lap: int, incoming_loss: float | None, loss: float | Exception, **guard: Any
                 ) -> tuple[str | None, Any]:
    run = _run({"blocks.0": _h(OLD)}, incoming_loss, **guard)
    why = await poison_check(_Store(OLD, new), _evaluate(loss), run, SimpleNamespace(lap=lap),  # type: ignore[arg-type]
                             {"blocks.0": _h(new)})
    return why, run


@pytest.mark.timeout(30)
async def test_a_layer_moved_past_the_bound_is_suspect() -> None:
    why, _ = await _check(_blob(50.0), lap=0, incoming_loss=None, loss=1.0)
    assert why is not None and "blocks.0 moved" in why and "limit 10" in why
    why, _ = await _check(_blob(1.5), lap=0, incoming_loss=None, loss=1.0)  # an honest-sized step
    assert why is None


@pytest.mark.timeout(30)
async def test_validation_loss_bound_from_the_second_lap_on() -> None:
    step = _blob(1.2)
    # Lap 0: no comparison yet, the loss only becomes the reference.
    why, run = await _check(step, lap=0, incoming_loss=None, loss=100.0)
    assert why is None and run.incoming_loss == 100.0
    why, run = await _check(step, lap=0, incoming_loss=1.0, loss=100.0)
    assert why is None, "the loss bound starts at the second lap"
    # Lap 1: more than val_loss_factor x the previous incoming model's loss is refused, and the reference stays.
    why, run = await _check(step, lap=1, incoming_loss=1.0, loss=4.5)
    assert why is not None and "validation loss 4.5" in why and "4x" in why
    assert run.incoming_loss == 1.0, "a refused model never becomes the reference"
    # Within the tolerance: accepted, and it becomes the reference.
    why, run = await _check(step, lap=1, incoming_loss=1.0, loss=3.9)
    assert why is None and run.incoming_loss == 3.9
    # A local evaluation failure never refuses honest work.
    why, run = await _check(step, lap=3, incoming_loss=1.0, loss=RuntimeError("worker died"))
    assert why is None
    # The guard can be switched off per job.
    why, _ = await _check(_blob(50.0), lap=1, incoming_loss=1.0, loss=100.0, enabled=False)
    assert why is None


@pytest.mark.timeout(30)
def test_loss_tolerance_is_at_least_2x() -> None:
    base = {"model": "mlp", "dataset": "digits", "laps": 2}
    assert validate_spec({**base, "guard": {"val_loss_factor": 2.0}})["guard"]["val_loss_factor"] == 2.0
    with pytest.raises(JobSpecError) as info:
        validate_spec({**base, "guard": {"val_loss_factor": 1.5}})
    assert "guard.val_loss_factor" in str(info.value)
