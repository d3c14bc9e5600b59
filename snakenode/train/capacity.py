"""Compute benchmark and per-layer memory/time measurement (torch; worker only).

The capacity profile (schema in docs/ARCHITECTURE.md) lets `snake/window.py` size a node's window without
trying it: per block, the extra memory and time of training it, on top of a fixed cost.

How each number is obtained (short: a few forward/backward passes on one batch):
- `fixed_mb`: RSS with the whole model at the frozen precision plus the data (runtime included), plus the
  largest transient of a frozen forward.
- `blocks[i].train_mb`: fp32 weights minus their frozen copy, grads, optimizer state, the KD teacher's copy
  of the block at frozen precision, and the activations the block saves (counted exactly with
  saved_tensors_hooks), for one micro-batch.
- `blocks[i].step_s`: extra seconds per batch when the block trains (forward+backward with weight grads,
  minus its frozen forward), measured once per distinct block shape.
- `blocks[i].pass_mb` / `pass_s`: what a *frozen* block costs when the backward pass runs through it (it
  lies after the window): the activations it keeps (only its input with `checkpoint_frozen`, since it is
  recomputed) and the time of its input-gradient backward (plus the recomputation when checkpointed).
  `snake/window.py` adds these for the frozen blocks after the window, which makes early windows dearer.
- `frozen_step_s`: forward of the whole model per batch, frozen, plus the loss's forward and backward
  from the head's input (paid every step, whichever layers train: for an LM the vocabulary projection).
Unless `kd.mode` is off, times include the KD teacher, which re-runs every layer after the first trained
one (auto may turn KD on for any node, so it is assumed on).
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
from snakenode.train.engine import Engine
from snakenode.train.frozen import freeze_module
from snakenode.train.hopconfig import EngineError, TrainConfig
from snakenode.train.layered import LayeredModel
from snakenode.train.memory import peak_rss_mb, reset_peak_rss, rss_mb

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
           "momentum": cfg.momentum > 0, "v": 2}
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
    loss_s = _loss_time(model, inputs["head"], x, kd_possible=str((job.get("kd") or {}).get("mode", "auto")) != "off")
    forward_s += loss_s * per_batch

    kd_mode = str((job.get("kd") or {}).get("mode", "auto"))
    kd_possible = kd_mode != "off"
    # frozen blocks with grad flowing through them: saved activations and input-grad backward time
    passes: list[tuple[float, float]] = []
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

            t_fwd = _timeit(lambda n=n, hin=hin: _nograd(model, n, hin), 1)
            t = max(0.0, _timeit(bwd, 1) - t_fwd)
            if cfg.checkpoint_frozen:
                saved, t = hin.numel() * hin.element_size(), t + t_fwd      # input kept; forward recomputed
            if kd_possible:
                t += t_fwd                                                   # the teacher runs it again
            sig_cache[sig] = (saved / 2**20, t)
            del out, g
        passes.append((sig_cache[sig][0], sig_cache[sig][1] * per_batch))

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
        freeze_module(mod, cfg.frozen_dtype)
        t_frozen = _timeit(lambda: _nograd(model, n, inputs[n]), 1)
        state_mb = params * (4.0 - fb + 4.0 + opt_bytes + fb) / 2**20      # weights, grads, optimizer, teacher
        extra = t_train - t_frozen + (t_frozen if kd_possible else 0.0)          # + the teacher's copy
        res = {"train_mb": round(state_mb + saved / 2**20, 3), "step_s": round(max(0.0, extra) * per_batch, 6)}
        cache[sig] = res
        return res

    cost_cache: dict[Any, dict[str, float]] = {}
    blocks = [{**layer_cost(f"blocks.{i}", cost_cache), "pass_mb": round(passes[i][0], 3),
               "pass_s": round(passes[i][1], 6)} for i in range(model.num_blocks)]
    stem = layer_cost("stem", cost_cache)
    head = layer_cost("head", cost_cache)
    n_train = len(train_b)
    engine.loaded = None
    return {"fixed_mb": round(base + transient, 3), "blocks": blocks, "stem": stem, "head": head,
            "frozen_step_s": round(forward_s, 6), "steps_per_epoch": max(1, math.ceil(n_train / cfg.batch))}


def _loss_time(model: LayeredModel, h_head: torch.Tensor, x: torch.Tensor, kd_possible: bool) -> float:
    """Loss forward+backward from the head's input: paid every step whatever trains (for LMs the
    vocabulary projection, recomputed in the backward pass, and the teacher's projection under KD)."""
    from snakenode.train import kd as K
    from snakenode.train.loss import lm_loss

    def run() -> None:
        h = h_head.detach().clone().requires_grad_(True)
        f = model.run("head", h)
        if model.task == "lm":
            y = x[:, : f.shape[1]] if x.dim() == 2 else torch.zeros(f.shape[:2], dtype=torch.long)
            tf = f.detach() if kd_possible else None
            teacher = {"head": model.get_layer("head")} if kd_possible else {}
            loss = lm_loss(model, f, y.long() % max(1, getattr(model, "vocab_size", 1)), tf, teacher,
                           0.5 if kd_possible else 0.0, 2.0)
        else:
            logits = model.project(f)
            loss = K.kd_loss(logits, logits.detach() if kd_possible else None,
                             torch.zeros(logits.shape[0], dtype=torch.long), 0.5 if kd_possible else 0.0, 2.0)
        torch.autograd.grad(loss, h)

    return _timeit(run, 1)


def _nograd(model: LayeredModel, n: str, h: Any) -> Any:
    with torch.no_grad():
        return model.run(n, h)


def _signature(model: LayeredModel, name: str) -> Any:
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

