"""The benchmark task, built from snakenode's own data and model code so Flower trains exactly what the
snake trains: the same partitions (`DataSpec.from_flags`, as a node builds it from `--data --partition
--shard --seed`), the same model and initial weights (`models.build_skeleton` + `models.initial_layers`
for the job's model, model_args and seed) and the same fixed test split.

What differs is only what each system does by design: FedAvg trains the whole model on every client
each round with plain cross-entropy and averages; a snake hop trains a window of layers (with KD when the
node's labels are skewed) and hands it on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from snakenode.train import data as D
from snakenode.train import models as M
from snakenode.train.layered import LayeredModel

EVAL_BATCH = 64          # the engine evaluates in batches of max(train batch, 64); the result does not depend on it


def data_spec(dataset: str, partition: str, partition_id: int, num_partitions: int, seed: int) -> D.DataSpec:
    """A client's data, exactly as a snake node started with the equivalent flags holds it."""
    return D.DataSpec.from_flags(dataset, partition, f"{partition_id}/{num_partitions}", seed)


def train_arrays(spec: D.DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """The client's training split: its partition minus the local validation holdout, as on a node."""
    s = D.load_split(spec, "train")
    assert s.x is not None and s.y is not None
    return s.x, s.y


def test_arrays(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed 20% stratified test split (seed 0); no client ever trains on it."""
    s = D.load_split(D.DataSpec.from_flags(dataset), "test")
    assert s.x is not None and s.y is not None
    return s.x, s.y


def job_like(model: str, model_args: dict[str, Any] | str, seed: int) -> dict[str, Any]:
    args = json.loads(model_args) if isinstance(model_args, str) else dict(model_args)
    return {"model": model, "model_args": args, "seed": seed}


def build_model(job: dict[str, Any]) -> LayeredModel:
    """The job's model with the deterministic initial weights every snake node starts from."""
    spec = M.spec_from_job(job)
    model = M.build_skeleton(spec)
    for name, tensors in M.initial_layers(spec, model):
        M.materialize(model, name, {k: v.detach().clone() for k, v in tensors.items()}, None)
    return model


def state_arrays(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_epochs(model: LayeredModel, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int, lr: float,
                 momentum: float, seed: int) -> dict[str, float]:
    """Plain local SGD on the whole model, as a FedAvg client does: a fresh optimizer every round."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator()
    gen.manual_seed(seed)
    model.train()
    n = len(yt)
    tot, count = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            if len(idx) < 2 <= n:
                continue                        # the engine skips 1-sample batches too (BatchNorm models)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            count += len(idx)
    model.eval()
    return {"train_loss": tot / max(count, 1), "num-examples": float(n)}


@torch.no_grad()
def evaluate(model: LayeredModel, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Test loss and accuracy, computed as the engine's `evaluate` computes them."""
    was = model.training
    model.eval()
    try:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        tot, correct = 0.0, 0
        for s in range(0, len(yt), EVAL_BATCH):
            logits = model(xt[s:s + EVAL_BATCH])
            tot += float(F.cross_entropy(logits, yt[s:s + EVAL_BATCH], reduction="sum"))
            correct += int((logits.argmax(-1) == yt[s:s + EVAL_BATCH]).sum())
        n = len(yt)
        return {"loss": tot / n, "accuracy": correct / n, "samples": float(n)}
    finally:
        model.train(was)
