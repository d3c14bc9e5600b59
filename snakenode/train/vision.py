"""The small vision classifiers: MLP, CNN and VGG-11-BN as layered models (torch; worker only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snakenode.train.layered import LayeredModel, Sequential3


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.relu(self.fc(h))


class _Plain(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(h))


class _MLPStem(nn.Module):
    def __init__(self, inputs: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.flatten(1)))


def _mlp(args: dict[str, Any]) -> LayeredModel:
    hidden, depth = int(args.get("hidden", 128)), int(args.get("depth", 4))
    inputs, classes = int(args.get("inputs", 64)), int(args.get("classes", 10))
    residual = bool(args.get("residual", True))
    blk = _Residual if residual else _Plain
    return Sequential3(lambda: _MLPStem(inputs, hidden), lambda i: blk(hidden),
                       lambda: nn.Linear(hidden, classes), depth)


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(h)))
        return F.max_pool2d(h, 2, ceil_mode=True) if self.pool else h


class _PoolHead(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _cnn(args: dict[str, Any]) -> LayeredModel:
    """Small CNN for 8x8 or 28x28 grey images: pools after every second block."""
    ch, depth = int(args.get("channels", 32)), int(args.get("depth", 4))
    cin, classes = int(args.get("in_channels", 1)), int(args.get("classes", 10))
    return Sequential3(lambda: _ConvBlock(cin, ch, False), lambda i: _ConvBlock(ch, ch, i % 2 == 1),
                       lambda: _PoolHead(ch, classes), depth)


_VGG11 = [(3, 64, True), (64, 128, True), (128, 256, False), (256, 256, True), (256, 512, False),
          (512, 512, True), (512, 512, False), (512, 512, True)]


class _Flatten(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.flatten(1))


def _vgg11(args: dict[str, Any]) -> LayeredModel:
    """VGG-11-BN for 32x32x3 (CIFAR-style, 9.2M parameters): 8 conv blocks, identity stem, linear head."""
    width = float(args.get("width", 1.0))
    classes = int(args.get("classes", 10))
    cfg = [(c if i == 0 else max(1, int(c * width)), max(1, int(o * width)), p) for i, (c, o, p) in enumerate(_VGG11)]
    return Sequential3(nn.Identity, lambda i: _ConvBlock(*cfg[i]), lambda: _Flatten(cfg[-1][1], classes), 8)



BUILDERS: dict[str, Callable[[dict[str, Any]], LayeredModel]] = {"mlp": _mlp, "cnn": _cnn, "vgg11": _vgg11}
