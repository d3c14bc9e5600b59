"""The KD teacher of a hop: the window's layers as they arrived, frozen (torch; worker only).

The teacher is a copy of the *trainable* layers only (at the frozen precision, since it only runs
forward); for every frozen layer it runs the student's own module, so KD costs the window's weights, not
a second model.
"""

from __future__ import annotations

import copy

from torch import nn

from snakenode.train import kd as K
from snakenode.train.frozen import freeze_module
from snakenode.train.layered import LayeredModel


def build_teacher(model: LayeredModel, trainable: set[str], frozen_dtype: str) -> dict[str, nn.Module]:
    """The KD teacher: frozen copies of the trainable layers as they arrived, at the frozen precision.
    Every other layer is shared with the student (passed as None to `model.run`)."""
    return {name: freeze_module(copy.deepcopy(model.get_layer(name)), frozen_dtype)
            for name in sorted(trainable)}


def teacher_on(kd_on: bool, kdc: K.KDConfig) -> bool:
    return kd_on and kdc.alpha > 0
