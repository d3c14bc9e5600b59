"""Evaluation of a whole layered model on a split: loss and accuracy, or perplexity (worker only)."""

from __future__ import annotations

import math
from typing import Any

import torch

from snakenode.train import kd as K
from snakenode.train.batches import Batches
from snakenode.train.layered import LayeredModel
from snakenode.train.loss import lm_loss

LM_EVAL_MAX_SEQS = 64            # cap on validation/test sequences per LM evaluation (CPU time)


@torch.no_grad()
def evaluate_model(model: LayeredModel, b: Batches, batch: int) -> dict[str, Any]:
    """Loss and accuracy (classifiers) or perplexity (LMs, at most LM_EVAL_MAX_SEQS sequences) of the
    whole model on `b`; every layer's train/eval mode is restored afterwards."""
    was = {n: model.get_layer(n).training for n in model.all_layer_names()}
    model.eval()
    try:
        n = len(b)
        if b.task == "lm":
            n = min(n, LM_EVAL_MAX_SEQS)
        if n == 0:
            return {"loss": float("nan"), ("perplexity" if b.task == "lm" else "accuracy"): float("nan"),
                    "samples": 0}
        tot_loss, correct, count = 0.0, 0, 0
        for s in range(0, n, batch):
            idx = torch.arange(s, min(n, s + batch))
            x, y = b.get(idx)
            h = model.model_inputs(x)
            for name in model.all_layer_names():
                h = model.run(name, h)
            if b.task == "lm":
                loss = lm_loss(model, h, y, None, {}, 0.0, 1.0)
                tot_loss += float(loss) * y.numel()
                count += y.numel()
            else:
                logits = model.project(h)
                tot_loss += float(K.kd_loss(logits, None, y, 0.0, 1.0, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                count += y.numel()
        loss = tot_loss / count
        if b.task == "lm":
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "samples": n}
        return {"loss": loss, "accuracy": correct / count, "samples": n}
    finally:
        for name, tr in was.items():
            model.get_layer(name).train(tr)

