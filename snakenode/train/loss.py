"""A window's loss: shared no-grad prefix, the student with grad, the teacher under no_grad (worker only).

The frozen prefix before the first trainable layer runs once per micro-batch and its output feeds both
the student and the KD teacher; `checkpoint_frozen` recomputes the frozen suffix in the backward pass
instead of storing it; LM losses are chunked over tokens so full-vocabulary logits never exist for a
whole batch.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from snakenode.train import kd as K
from snakenode.train.layered import LayeredModel


def lm_chunk_tokens(model: LayeredModel) -> int:
    """Tokens per loss chunk: ~2M logits (8 MB fp32) whatever the vocabulary (env SNAKENODE_LOSS_CHUNK).

    Smaller chunks save memory but dequantise a frozen tied head once more per chunk."""
    vocab = int(getattr(model, "vocab_size", 0) or 256)
    return max(8, min(1024, int(os.environ.get("SNAKENODE_LOSS_CHUNK", 2 * 1024 * 1024)) // vocab))



def window_loss(model: LayeredModel, x: torch.Tensor, y: torch.Tensor, order: list[str], first: int,
                trainable: set[str], teacher: dict[str, nn.Module], kdc: K.KDConfig,
                checkpoint_frozen: bool, chunk_tokens: int = 0) -> torch.Tensor:
    """One micro-batch's loss: shared no-grad prefix, student with grad, teacher (if any) under no_grad."""
    h = model.model_inputs(x)
    with torch.no_grad():
        for name in order[:first]:
            h = model.run(name, h)
    hs = h
    for name in order[first:]:
        if name in trainable or not checkpoint_frozen or not hs.requires_grad:
            hs = model.run(name, hs)
        else:
            hs = checkpoint(model.run, name, hs, use_reentrant=False)
    ht = None
    if teacher:
        with torch.no_grad():
            ht = h
            for name in order[first:]:
                ht = model.run(name, ht, teacher.get(name))
    if model.task == "lm":
        return lm_loss(model, hs, y, ht, teacher, kdc.alpha if teacher else 0.0, kdc.T, chunk_tokens)
    t_logits = None if ht is None else model.project(ht, teacher.get("stem"), teacher.get("head"))
    return K.kd_loss(model.project(hs), t_logits, y, kdc.alpha if teacher else 0.0, kdc.T)


def lm_loss(model: LayeredModel, hs: torch.Tensor, y: torch.Tensor, ht: torch.Tensor | None,
            teacher: dict[str, nn.Module], alpha: float, T: float, chunk_tokens: int = 0) -> torch.Tensor:
    """LM loss from head features: the fused vocabulary-sliced loss when the output projection is frozen
    (the usual LLM hop), else token chunks under checkpointing."""
    proj = getattr(model, "frozen_projection", None)
    ws = proj() if proj is not None else None
    wt = proj(teacher.get("stem"), teacher.get("head")) if proj is not None and ht is not None else None
    if ws is not None and (ht is None or wt is not None):
        return K.fused_lm_loss(hs, y, ws, ht, wt, alpha, T)
    if chunk_tokens <= 0:
        chunk_tokens = lm_chunk_tokens(model)
    t_proj = None
    if teacher:
        def t_proj(f: torch.Tensor) -> torch.Tensor:
            return model.project(f, teacher.get("stem"), teacher.get("head"))
    return K.chunked_lm_loss(hs, y, model.project, ht, t_proj, alpha, T, chunk_tokens)

