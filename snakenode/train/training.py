"""The training loop of one hop: epochs of shuffled batches over the window's layers (torch; worker only).

Only the trainable layers get an optimizer; gradients are accumulated over micro-batches, and the loop
stops at `train.max_steps` or at the hop's time budget. The engine prepares the model, data and teacher
and stores what comes out.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from snakenode.train import data as D
from snakenode.train import kd as K
from snakenode.train.batches import Batches
from snakenode.train.hopconfig import EngineError, TrainConfig
from snakenode.train.layered import LayeredModel
from snakenode.train.loss import window_loss

EventFn = Callable[[str, dict[str, Any]], None]


def rng_seed(*parts: Any) -> int:
    """A seed from the hop's identity (model seed, state, window, data): the same hop shuffles the same."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class LoopResult:
    samples: int
    steps: int
    stopped: str | None               # None (all epochs ran), "max_steps" or "max_time_s"
    t_train_s: float


def train_window(model: LayeredModel, train_b: Batches, spec: D.DataSpec, cfg: TrainConfig, kdc: K.KDConfig,
                 trainable: set[str], teacher: dict[str, nn.Module], gen: torch.Generator, t_start: float,
                 max_time_s: float | None, on_event: EventFn | None, slowdown: float) -> LoopResult:
    """Train the `trainable` layers in place; every other layer stays frozen. Gradients are dropped at the
    end (they are not kept between hops). `slowdown` > 1 stretches every step (a scenario knob)."""
    order = model.all_layer_names()
    first = min(order.index(n) for n in trainable)
    params = [p for n in sorted(trainable) for p in model.get_layer(n).parameters()]
    opt = optimizer(cfg, params)
    for n in order:
        model.get_layer(n).train(n in trainable)

    t_train0 = time.monotonic()
    samples = steps = 0
    stopped = None
    last_event = time.monotonic()
    n = len(train_b)
    if n == 0:
        raise EngineError("bad_data", f"no training samples for {spec.data_flag} shard "
                                      f"{spec.shard_index}/{spec.shard_count}")
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        ep_loss, ep_count = 0.0, 0
        for s in range(0, n, cfg.batch):
            t_step = time.monotonic()
            idx = perm[s:s + cfg.batch]
            if model.task == "classification" and len(idx) < 2 and n >= 2:
                continue                                # BatchNorm cannot train on one sample
            opt.zero_grad(set_to_none=True)
            bl = 0.0
            for ms in range(0, len(idx), cfg.micro):
                midx = idx[ms:ms + cfg.micro]
                x, y = train_b.get(midx)
                loss = window_loss(model, x, y, order, first, trainable, teacher, kdc, cfg.checkpoint_frozen)
                (loss * (len(midx) / len(idx))).backward()
                bl += float(loss.detach()) * len(midx)
            opt.step()
            if slowdown > 1.0:
                time.sleep((slowdown - 1.0) * (time.monotonic() - t_step))
            steps += 1
            samples += len(idx)
            ep_loss += bl
            ep_count += len(idx)
            if on_event is not None and time.monotonic() - last_event > 2.0:
                elapsed = time.monotonic() - t_train0
                on_event("step", {"epoch": epoch, "step": steps, "loss": bl / len(idx), "samples": samples,
                                  "samples_per_s": samples / elapsed if elapsed > 0 else None})
                last_event = time.monotonic()
            if cfg.max_steps and steps >= cfg.max_steps:
                stopped = "max_steps"
                break
            if max_time_s is not None and time.monotonic() - t_start > max_time_s:
                stopped = "max_time_s"
                break
        if on_event is not None:
            elapsed = time.monotonic() - t_train0
            on_event("epoch", {"epoch": epoch, "step": steps, "loss": ep_loss / max(ep_count, 1), "samples": samples,
                               "samples_per_s": samples / elapsed if elapsed > 0 else None})
        if stopped:
            break
    t_train = time.monotonic() - t_train0
    for p in params:
        p.grad = None                                  # grads are not kept between hops
    del opt
    return LoopResult(samples, steps, stopped, t_train)


def round_to_bf16(model: LayeredModel, trainable: set[str]) -> None:
    """The job moves its model in bf16 (bundle.bf16_data_start): the trained layers take their nearest
    bfloat16 values here, in place, so the hashes name exactly what travels and what this worker keeps
    in memory."""
    with torch.no_grad():
        for name in trainable:
            for v in model.layer_state(name).values():
                if v.dtype == torch.float32:
                    v.copy_(v.to(torch.bfloat16).to(torch.float32))
