"""Distillation losses and the KD on/off decision (torch; worker only).

loss = (1 - a) * CE(student, y) + a * T^2 * KL(teacher || student) on temperature-softened outputs,
KL averaged per example (per token for LMs). The T^2 factor keeps the soft term's gradient scale
independent of T (Hinton et al.). For classification the CE is by default the balanced softmax
(`kd.balance = "softmax"`): the node's log label frequencies are added to the student's logits inside the CE
only, so a node that lacks a class stops pushing that class down (measured on the `cnn` under label skew:
benchmarks/README.md, "quality.py"). Over a large vocabulary neither the logits nor their softmax are ever
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
KD_BALANCES = ("none", "softmax")


@dataclass(frozen=True)
class KDConfig:
    mode: str = "auto"
    alpha: float = 0.5
    T: float = 2.0
    reference: str = "uniform"
    auto_threshold: float = 0.1
    balance: str = "softmax"
    prior: tuple[float, ...] | None = None    # the node's label histogram, set per hop by the engine

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> KDConfig:
        kd = job.get("kd") or {}
        c = cls(str(kd.get("mode", "auto")), float(kd.get("alpha", 0.5)), float(kd.get("T", 2.0)),
                str(kd.get("reference", "uniform")), float(kd.get("auto_threshold", 0.1)),
                str(kd.get("balance", "softmax")))
        if c.mode not in KD_MODES:
            raise ValueError(f"kd.mode must be one of {KD_MODES}, got {c.mode!r}")
        if c.reference not in KD_REFERENCES:
            raise ValueError(f"kd.reference must be one of {KD_REFERENCES}, got {c.reference!r}")
        if c.balance not in KD_BALANCES:
            raise ValueError(f"kd.balance must be one of {KD_BALANCES}, got {c.balance!r}")
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


def log_prior(hist: tuple[float, ...] | list[float] | None) -> torch.Tensor | None:
    """log of the add-one smoothed class frequencies of a label histogram (None when there is none).

    Add-one keeps a class the node lacks finite: its logit is lowered by ~log(samples), so the
    cross-entropy stops pushing it down without ever training it up."""
    if not hist or sum(hist) <= 0:
        return None
    h = torch.tensor([float(v) for v in hist], dtype=torch.float32) + 1.0
    return torch.log(h / h.sum())


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, alpha: float,
            T: float, reduction: str = "mean", prior: torch.Tensor | None = None) -> torch.Tensor:
    """Classification KD loss over rows of logits. teacher=None (KD off) gives plain CE.
    reduction='sum' returns the sum over rows (used by the chunked LM loss).

    `prior` (log class frequencies of the node's labels, `log_prior`) turns the CE into the balanced
    softmax (logit adjustment): CE(logits + prior, y). Under label skew plain CE lowers the logits of every
    class the node lacks; with the prior added, those classes already look improbable to the loss, so
    their logits, and the features that feed them, are left to the KD term."""
    ce = F.cross_entropy(student.float() + prior if prior is not None else student.float(), targets,
                         reduction="sum")
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


class _FusedVocabLoss(torch.autograd.Function):
    """Mean per-token (1-a)*CE + a*T^2*KL(teacher||student) with the vocabulary walked in slices.

    For a frozen output projection (the usual LM hop: embeddings and tied head frozen): each weight slice
    is dequantised once in the forward pass and once in the backward pass (instead of once per token
    chunk per pass), logits exist one slice at a time, and softmax normalisers are accumulated online.
    Only the features get a gradient."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, th: torch.Tensor | None, y: torch.Tensor, ws: Any, wt: Any,
                alpha: float, T: float, vchunk: int) -> torch.Tensor:  # type: ignore[override]
        n = h.shape[0]
        vocab = ws.qweight.shape[0]
        kd = th is not None and alpha > 0
        neg = torch.full((n,), -torch.inf, dtype=torch.float32)
        m1, l1 = neg.clone(), torch.zeros(n)            # CE normaliser of s
        mT, lT = neg.clone(), torch.zeros(n)            # normaliser of s/T
        mt, lt = neg.clone(), torch.zeros(n)            # normaliser of t/T
        a_tt, a_ts = torch.zeros(n), torch.zeros(n)     # sum exp(t/T - mt) * t/T, and * s/T
        tgt = torch.zeros(n)
        hf = h.float()
        thf = th.float() if kd else None
        for v0 in range(0, vocab, vchunk):
            v1 = min(vocab, v0 + vchunk)
            t = None
            if kd:
                t = thf @ wt.rows(v0, v1).T / T         # teacher first: its rows() may reuse the scratch
            s = hf @ ws.rows(v0, v1).T
            inr = (y >= v0) & (y < v1)
            if inr.any():
                idx = inr.nonzero().squeeze(1)
                tgt[idx] = s[idx, y[idx] - v0]
            m1, l1 = _online(m1, l1, s)
            if kd:
                sT = s / T
                mT, lT = _online(mT, lT, sT)
                new_mt = torch.maximum(mt, t.amax(1))
                scale = torch.exp(mt - new_mt)
                e = torch.exp(t - new_mt[:, None])
                lt = lt * scale + e.sum(1)
                a_tt = a_tt * scale + (e * t).sum(1)
                a_ts = a_ts * scale + (e * sT).sum(1)
                mt = new_mt
        lse = m1 + torch.log(l1)
        ce = (lse - tgt).sum()
        total = (1 - alpha) * ce if kd else ce
        lse_sT = lse_tT = None
        if kd:
            lse_sT, lse_tT = mT + torch.log(lT), mt + torch.log(lt)
            # KL(p_t || p_s) = E_t[t/T] - lse_t - E_t[s/T] + lse_s per row
            kl = (a_tt / lt - lse_tT - a_ts / lt + lse_sT).sum()
            total = total + alpha * T * T * kl
        ctx.save_for_backward(h, th if kd else None, y, lse, lse_sT if kd else None, lse_tT if kd else None)
        ctx.ws, ctx.wt, ctx.alpha, ctx.T, ctx.vchunk, ctx.kd = ws, wt, alpha, T, vchunk, kd
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        h, th, y, lse, lse_sT, lse_tT = ctx.saved_tensors
        ws, wt, alpha, T, vchunk, kd = ctx.ws, ctx.wt, ctx.alpha, ctx.T, ctx.vchunk, ctx.kd
        n = h.shape[0]
        vocab = ws.qweight.shape[0]
        hf = h.float()
        grad = torch.zeros_like(hf)
        coef = float(g) / n
        a_ce = (1 - alpha) if kd else 1.0
        for v0 in range(0, vocab, vchunk):
            v1 = min(vocab, v0 + vchunk)
            pt = None
            if kd:
                pt = torch.exp(th.float() @ wt.rows(v0, v1).T / T - lse_tT[:, None])
            w = ws.rows(v0, v1)
            s = hf @ w.T
            gs = torch.exp(s - lse[:, None]).mul_(a_ce)
            inr = (y >= v0) & (y < v1)
            if inr.any():
                idx = inr.nonzero().squeeze(1)
                gs[idx, y[idx] - v0] -= a_ce
            if kd:
                gs += alpha * T * (torch.exp(s / T - lse_sT[:, None]) - pt)
            grad.addmm_(gs, w, alpha=coef)
        return grad.to(h.dtype), None, None, None, None, None, None, None


def _online(m: torch.Tensor, l: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: E741
    new_m = torch.maximum(m, x.amax(1))
    return new_m, l * torch.exp(m - new_m) + torch.exp(x - new_m[:, None]).sum(1)


def fused_lm_loss(feats: torch.Tensor, targets: torch.Tensor, weight: Any, teacher_feats: torch.Tensor | None = None,
                  teacher_weight: Any = None, alpha: float = 0.0, T: float = 1.0,
                  max_logits: int = 1 << 20) -> torch.Tensor:
    """`chunked_lm_loss` for a frozen output projection (`weight.rows(v0, v1)`, no bias): same value and
    feature gradient, far fewer weight dequantisations, O(tokens x slice) memory."""
    h = feats.reshape(-1, feats.shape[-1])
    th = None if teacher_feats is None else teacher_feats.reshape(-1, teacher_feats.shape[-1]).detach()
    n, hidden = h.shape
    vchunk = max(64, min(max_logits // max(1, n), (1 << 20) // max(1, hidden)))
    return _FusedVocabLoss.apply(h, th, targets.reshape(-1), weight, teacher_weight or weight, alpha, T, vchunk)
