"""Distillation losses and the KD on/off decision (torch; worker only).

loss = (1 - a) * CE(student, y) + a * T^2 * KL(teacher || student) on temperature-softened outputs,
KL averaged per example (per token for LMs). The T^2 factor keeps the soft term's gradient scale
independent of T (Hinton et al.). Over a large vocabulary neither the logits nor their softmax are ever
materialised for a whole batch: `chunked_lm_loss` walks token chunks, each under activation checkpointing,
so peak memory is one chunk's logits whatever the sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from snakenode.train.data import js_divergence

KD_MODES = ("on", "off", "auto")
KD_REFERENCES = ("uniform", "union")


@dataclass(frozen=True)
class KDConfig:
    mode: str = "auto"
    alpha: float = 0.5
    T: float = 2.0
    reference: str = "uniform"
    auto_threshold: float = 0.1

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> KDConfig:
        kd = job.get("kd") or {}
        c = cls(str(kd.get("mode", "auto")), float(kd.get("alpha", 0.5)), float(kd.get("T", 2.0)),
                str(kd.get("reference", "uniform")), float(kd.get("auto_threshold", 0.1)))
        if c.mode not in KD_MODES:
            raise ValueError(f"kd.mode must be one of {KD_MODES}, got {c.mode!r}")
        if c.reference not in KD_REFERENCES:
            raise ValueError(f"kd.reference must be one of {KD_REFERENCES}, got {c.reference!r}")
        if not (0.0 <= c.alpha <= 1.0) or c.T <= 0:
            raise ValueError(f"kd.alpha must be in [0, 1] and kd.T > 0, got alpha={c.alpha}, T={c.T}")
        return c


def kd_decision(cfg: KDConfig, task: str, label_hist: list[int] | None,
                reference_hist: list[float] | None) -> tuple[bool, float | None]:
    """(KD on?, JS divergence or None). Pure. `auto`: text jobs always on; classification on when the
    node's label histogram diverges from the reference (uniform, or the joined nodes' union) by more than
    `auto_threshold`. Without a union histogram, `union` falls back to uniform."""
    if cfg.mode == "on":
        on, need_js = True, task != "lm"
    elif cfg.mode == "off":
        on, need_js = False, task != "lm"
    else:
        on, need_js = task == "lm", task != "lm"
    if not need_js or not label_hist or sum(label_hist) == 0:
        return on, None
    ref: list[float]
    if cfg.reference == "union" and reference_hist and len(reference_hist) == len(label_hist) \
            and sum(reference_hist) > 0:
        ref = [float(v) for v in reference_hist]
    else:
        ref = [1.0] * len(label_hist)
    js = js_divergence(label_hist, ref)
    if cfg.mode == "auto":
        on = js > cfg.auto_threshold
    return on, js


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, alpha: float,
            T: float, reduction: str = "mean") -> torch.Tensor:
    """Classification KD loss over rows of logits. teacher=None (KD off) gives plain CE.
    reduction='sum' returns the sum over rows (used by the chunked LM loss)."""
    ce = F.cross_entropy(student.float(), targets, reduction="sum")
    n = targets.numel()
    if teacher is None or alpha == 0.0:
        return ce if reduction == "sum" else ce / n
    s_log = F.log_softmax(student.float() / T, dim=-1)
    t_log = F.log_softmax(teacher.detach().float() / T, dim=-1)
    kl = F.kl_div(s_log, t_log, reduction="sum", log_target=True)          # sum_i KL(t_i || s_i)
    total = (1.0 - alpha) * ce + alpha * T * T * kl
    return total if reduction == "sum" else total / n


def chunked_lm_loss(feats: torch.Tensor, targets: torch.Tensor,
                    project: Callable[[torch.Tensor], torch.Tensor],
                    teacher_feats: torch.Tensor | None = None,
                    teacher_project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    alpha: float = 0.0, T: float = 1.0, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean per-token (KD) loss from head features (B, S, H) without holding full-vocabulary logits.

    Each chunk of tokens is projected, scored and dropped; its logits are recomputed in the backward pass
    (checkpointing), so the saved state is the features only."""
    h = feats.reshape(-1, feats.shape[-1])
    y = targets.reshape(-1)
    th = None if teacher_feats is None else teacher_feats.reshape(-1, teacher_feats.shape[-1]).detach()
    tp = teacher_project or project
    n = y.numel()
    if chunk_tokens <= 0:
        # ~4M logits per chunk (16 MB fp32): a 49k vocabulary gets 85-token chunks, a byte vocabulary 1024
        vocab = int(project(h[:1].detach()).shape[-1]) if n else 1
        chunk_tokens = max(8, min(1024, (4 * 1024 * 1024) // max(1, vocab)))

    def piece(hc: torch.Tensor, yc: torch.Tensor, tc: torch.Tensor | None) -> torch.Tensor:
        logits = project(hc)
        t_logits = None
        if tc is not None:
            with torch.no_grad():
                t_logits = tp(tc)
        return kd_loss(logits, t_logits, yc, alpha, T, reduction="sum")

    total = feats.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_tokens):
        e = min(n, s + chunk_tokens)
        tc = None if th is None else th[s:e]
        if h.requires_grad:
            part = checkpoint(piece, h[s:e], y[s:e], tc, use_reentrant=False)
        else:
            part = piece(h[s:e], y[s:e], tc)
        total = total + part
    return total / n
