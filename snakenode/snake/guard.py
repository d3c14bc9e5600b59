"""The poisoning guard's verdicts (docs/PROTOCOL.md, "Poisoning guard"), pure: no I/O, no trio.

The receiver measures (the relative change of each layer against the version it last held, and the local
validation loss of the incoming model); these functions decide. Hard check: no layer may move more than
`guard.max_rel_change` times its norm. From the second lap on, the incoming model's validation loss may be
at most `guard.val_loss_factor` times that of the previous incoming model this node accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def layer_verdict(name: str, rel_change: float, limit: float) -> str | None:
    """Why a layer that moved `rel_change` times its norm is suspect, or None."""
    if rel_change > limit:
        return f"layer {name} moved {rel_change:.3g}x its norm since this node last held it (limit {limit:g})"
    return None


@dataclass(frozen=True)
class LossVerdict:
    why: str | None  # why the model is suspect, or None
    reference: float | None  # the loss the next incoming model is compared with (unchanged when refused)


def loss_verdict(lap: int, loss: float, previous: float | None, factor: float) -> LossVerdict:
    """The validation-loss bound. It starts at the second lap (lap 0 models are all close to the initial
    one); a NaN loss neither refuses the model nor becomes the reference."""
    if math.isnan(loss):
        return LossVerdict(None, previous)
    if lap >= 1 and previous is not None and loss > factor * previous:
        return LossVerdict(f"validation loss {loss:.4g} is over {factor:g}x that of the previous incoming "
                           f"model ({previous:.4g})", previous)
    return LossVerdict(None, loss)
