"""Compute benchmark and per-layer memory/time measurement (torch; worker only).

The capacity profile (schema in docs/ARCHITECTURE.md) lets `snake/window.py` size a node's window without
trying it: per block, the extra memory and time of training it, on top of a fixed cost.

How each number is obtained (short: a few forward/backward passes on one batch):
- `fixed_mb`: RSS with the whole model at the frozen precision plus the data (runtime included), plus the
  largest transient of a frozen forward, plus the activations that frozen blocks keep for the backward pass
  when the window is at the very start (the worst case; with `checkpoint_frozen` only block inputs).
- `blocks[i].train_mb`: fp32 weights minus their frozen copy, grads, optimizer state, the KD teacher's copy
  of the block at frozen precision, and the activations the block saves (counted exactly with
  saved_tensors_hooks), for one micro-batch.
- `blocks[i].step_s`: extra seconds per batch when the block trains (forward+backward with weight grads,
  minus its frozen forward), measured once per distinct block shape.
- `frozen_step_s`: forward of the whole model per batch, plus the input-gradient backward through every
  frozen block (worst case), so hop time estimates err on the long side.
The profile is cached by the worker in HOME/cache/capacity-<key>.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snakenode.train import models as M
from snakenode.train.engine import Engine, EngineError, TrainConfig, peak_rss_mb, reset_peak_rss, rss_mb

WORKLOAD = "mlp-ref-v1"
_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0}


def reference_benchmark(seconds: float = 1.0) -> dict[str, Any]:
    """A fixed MLP training workload (64-256-256-10, batch 64, SGD): comparable samples/s across nodes."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(64, 64, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    dt = time.perf_counter() - t0
    return {"samples_per_s": n * 64 / dt, "workload": WORKLOAD}


def cache_key(job: dict[str, Any], data: dict[str, Any]) -> str:
    cfg = TrainConfig.from_job(job)
    doc = {"model": job.get("model"), "model_args": job.get("model_args") or {}, "batch": cfg.batch,
           "micro": cfg.micro, "frozen_dtype": cfg.frozen_dtype, "optimizer": cfg.optimizer,
           "checkpoint_frozen": cfg.checkpoint_frozen, "seq_len": cfg.seq_len, "data": data.get("name"),
           "momentum": cfg.momentum > 0, "v": 1}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _saved_bytes(fn: Any) -> tuple[Any, int]:
    """Run fn() and count the bytes autograd saves for backward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _timeit(fn: Any, reps: int = 2) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _param_count(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def measure(engine: Engine, job: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    cfg = TrainConfig.from_job(job)
    spec = M.spec_from_job(job)
    dspec = Engine._data_spec(data)
    engine.loaded = None                                     # never hold two copies of the model
    lo = engine._skeleton(spec)
    model = lo.model
    init = dict(M.initial_layers(spec, model)) if not M.is_large(model) else None
    for name in model.layer_names():
        tensors = init[name] if init is not None else M.initial_layer(spec, model, name)
        M.materialize(model, name, tensors, cfg.frozen_dtype)
        del tensors
    lo.state, lo.mode = {}, {n: cfg.frozen_dtype for n in model.layer_names()}
    train_b = engine._batches(lo, dspec, "train", cfg)
    if len(train_b) == 0:
        raise EngineError("bad_data", "no training samples to measure capacity with")
    micro = min(cfg.micro, len(train_b))
    x, _y = train_b.get(torch.arange(micro))
    per_batch = math.ceil(cfg.batch / micro)
    model.eval()
    names = model.all_layer_names()

    # fixed: resident model + data, frozen forward transient
    base = rss_mb()
    reset_peak_rss()
    inputs: dict[str, Any] = {}
    with torch.no_grad():
        h = model.model_inputs(x)
        for n in names:
            inputs[n] = h
            h = model.run(n, h)
        model.project(h[:, :8] if model.task == "lm" else h)
    transient = max(0.0, peak_rss_mb() - base)

    def fwd_all() -> None:
        with torch.no_grad():
            hh = model.model_inputs(x)
            for n in names:
                hh = model.run(n, hh)

    forward_s = _timeit(fwd_all) * per_batch

    # frozen blocks with grad flowing through them: saved activations and input-grad backward time
    frozen_act_mb, frozen_bwd_s = [], []
    sig_cache: dict[Any, tuple[float, float]] = {}
    for i in range(model.num_blocks):
        n = f"blocks.{i}"
        sig = _signature(model, n)
        if sig not in sig_cache:
            hin = inputs[n].detach().clone().requires_grad_(True)
            out, saved = _saved_bytes(lambda n=n, hin=hin: model.run(n, hin))
            g = torch.ones_like(out)

            def bwd(n: str = n, hin: torch.Tensor = hin, g: torch.Tensor = g) -> None:
                o = model.run(n, hin)
                torch.autograd.grad(o, hin, g)

            t = max(0.0, _timeit(bwd, 1) - _timeit(lambda n=n, hin=hin: _nograd(model, n, hin), 1))
            sig_cache[sig] = (saved / 2**20, t)
            del out, g
        frozen_act_mb.append(sig_cache[sig][0])
        frozen_bwd_s.append(sig_cache[sig][1] * per_batch)
    if cfg.checkpoint_frozen:
        act_fixed = max(frozen_act_mb, default=0.0) + sum(
            inputs[f"blocks.{i}"].numel() * 4 / 2**20 for i in range(model.num_blocks))
    else:
        act_fixed = sum(frozen_act_mb)

    opt_bytes = {"sgd": 4.0 if cfg.momentum > 0 else 0.0, "adam": 8.0, "adamw": 8.0}[cfg.optimizer]
    fb = _BYTES[cfg.frozen_dtype]

    def layer_cost(n: str, cache: dict[Any, dict[str, float]]) -> dict[str, float]:
        if n not in model.layer_names():
            return {"train_mb": 0.0, "step_s": 0.0}
        sig = _signature(model, n)
        if sig in cache:
            return cache[sig]
        tensors = init[n] if init is not None else M.initial_layer(spec, model, n)
        M.materialize(model, n, tensors, None)
        del tensors
        mod = model.get_layer(n)
        mod.train()
        params = _param_count(mod)
        hin = inputs[n]
        if torch.is_floating_point(hin):
            hin = hin.detach().clone().requires_grad_(n != "stem")

        def run_train() -> Any:
            o = model.run(n, hin)
            if n == "head":
                o = model.project(o[:, :128] if model.task == "lm" else o)
            return o

        out, saved = _saved_bytes(run_train)
        del out

        def fb_step() -> None:
            o = run_train()
            o.float().pow(2).mean().backward()
            mod.zero_grad(set_to_none=True)

        t_train = _timeit(fb_step, 1)
        M.freeze_module(mod, cfg.frozen_dtype)
        t_frozen = _timeit(lambda: _nograd(model, n, inputs[n]), 1)
        state_mb = params * (4.0 - fb + 4.0 + opt_bytes + fb) / 2**20      # weights, grads, optimizer, teacher
        res = {"train_mb": round(state_mb + saved / 2**20, 3),
               "step_s": round(max(0.0, t_train - t_frozen) * per_batch, 6)}
        cache[sig] = res
        return res

    cost_cache: dict[Any, dict[str, float]] = {}
    blocks = [layer_cost(f"blocks.{i}", cost_cache) for i in range(model.num_blocks)]
    stem = layer_cost("stem", cost_cache)
    head = layer_cost("head", cost_cache)
    n_train = len(train_b)
    engine.loaded = None
    return {"fixed_mb": round(base + transient + act_fixed, 3), "blocks": blocks, "stem": stem, "head": head,
            "frozen_step_s": round(forward_s + sum(frozen_bwd_s), 6),
            "steps_per_epoch": max(1, math.ceil(n_train / cfg.batch)),
            "forward_s": round(forward_s, 6), "frozen_backward_s": round(sum(frozen_bwd_s), 6)}


def _nograd(model: M.LayeredModel, n: str, h: Any) -> Any:
    with torch.no_grad():
        return model.run(n, h)


def _signature(model: M.LayeredModel, name: str) -> Any:
    if name in ("stem", "head"):
        return name
    return tuple((k, tuple(v.shape)) for k, v in model._templates[name].state_dict().items())


def cached_measure(engine: Engine, home: str | os.PathLike[str], job: dict[str, Any],
                   data: dict[str, Any]) -> dict[str, Any]:
    path = Path(home) / "cache" / f"capacity-{cache_key(job, data)}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        pass
    prof = measure(engine, job, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(prof, sort_keys=True))
    os.replace(tmp, path)
    return prof

