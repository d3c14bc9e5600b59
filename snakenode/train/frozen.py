"""Frozen layers at fp32, bf16 or int8 (torch; imported only in the worker).

Frozen layers replace their Linear/Conv/Embedding modules by `Frozen*` modules whose autograd functions
save no activations (a frozen weight needs no input for its gradient) and recompute the dequantised
weight in chunks on the way back; frozen BatchNorm folds into a per-channel affine. Building a model
layer by layer and converting each layer here as it is materialised is what lets a 1.3B-parameter hop fit
a few GB: the fp32 copy of a frozen layer exists only while that layer is converted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snakenode.train.layered import ModelError

FROZEN_DTYPES = ("fp32", "bf16", "int8")
_CHUNK_ELEMS = 1024 * 1024          # dequantise at most this many weight elements at once (4 MB fp32)


def _quantize(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-output-row symmetric int8 (absmax) or a bf16 cast; fp32 keeps the tensor."""
    w = w.detach()
    if mode == "fp32":
        return w.float().contiguous(), None
    if mode == "bf16":
        return w.to(torch.bfloat16).contiguous(), None
    flat = w.reshape(w.shape[0], -1)
    q = torch.empty(flat.shape, dtype=torch.int8)
    scale = torch.empty(flat.shape[0], dtype=torch.float32)
    step = max(1, _CHUNK_ELEMS // max(1, flat.shape[1]))
    for s in range(0, flat.shape[0], step):              # row chunks: the fp32 temporaries stay small
        rows = flat[s:s + step].float()
        sc = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q[s:s + step] = torch.round(rows / sc[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[s:s + step] = sc
    return q.reshape(w.shape), scale


_SCRATCH: list[torch.Tensor] = []


def _scratch(n: int) -> torch.Tensor:
    """One reusable fp32 buffer for dequantised weight chunks: repeated multi-MB allocations would each
    cost fresh pages (and fragment the heap), on every frozen layer, forward and backward."""
    if not _SCRATCH or _SCRATCH[0].numel() < n:
        _SCRATCH[:] = [torch.empty(max(n, _CHUNK_ELEMS), dtype=torch.float32)]
    return _SCRATCH[0][:n]


class FrozenWeight(nn.Module):
    """A frozen weight (rows = output features) stored at low precision, dequantised by row chunks."""

    def _init_weight(self, w: torch.Tensor, mode: str) -> None:
        q, scale = _quantize(w, mode)
        self.mode = mode
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Dequantised rows [start, end). For bf16/int8 the result lives in a shared scratch buffer that
        the next call overwrites: use it at once (the autograd functions here never keep it)."""
        w = self.qweight[start:end]
        if self.mode == "fp32":
            return w
        out = _scratch(w.numel()).view(w.shape)
        out.copy_(w)                                    # int8/bf16 -> fp32 without a fresh allocation
        if self.mode == "int8":
            out.mul_(self.scale[start:end].reshape(-1, *([1] * (w.dim() - 1))))
        return out

    def full(self) -> torch.Tensor:
        return self.rows(0, self.qweight.shape[0])

    def chunk_rows(self) -> int:
        per_row = max(1, self.qweight[0].numel())
        return max(1, _CHUNK_ELEMS // per_row)


class _FrozenLinearFn(torch.autograd.Function):
    """y = x W^T (+ b) with W frozen: saves nothing, recomputes W chunks for grad_x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mod: FrozenWeight, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.mod = mod
        n_out = mod.qweight.shape[0]
        step = mod.chunk_rows()
        if step >= n_out:
            y = F.linear(x, mod.full(), bias)
        else:
            y = x.new_empty(*x.shape[:-1], n_out)
            for s in range(0, n_out, step):
                e = min(n_out, s + step)
                y[..., s:e] = F.linear(x, mod.rows(s, e), None if bias is None else bias[s:e])
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        mod = ctx.mod
        n_out = mod.qweight.shape[0]
        step = mod.chunk_rows()
        gx = None
        for s in range(0, n_out, step):
            e = min(n_out, s + step)
            part = g[..., s:e].matmul(mod.rows(s, e))
            gx = part if gx is None else gx.add_(part)
        return gx, None, None


class FrozenLinear(FrozenWeight):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> None:
        super().__init__()
        self._init_weight(weight, mode)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinearFn.apply(x, self, self.bias)


class FrozenEmbedding(FrozenWeight):
    """Rows are dequantised only for the ids looked up; `as_linear` serves a tied LM head."""

    def __init__(self, weight: torch.Tensor, mode: str, padding_idx: int | None = None) -> None:
        super().__init__()
        self._init_weight(weight, mode)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.qweight[ids].float()
        if self.mode == "int8":
            w = w * self.scale[ids].unsqueeze(-1)
        return w

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinearFn.apply(x, self, None)


class _FrozenConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mod: FrozenConv2d) -> torch.Tensor:  # type: ignore[override]
        ctx.mod, ctx.shape = mod, x.shape
        return F.conv2d(x, mod.full(), mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        m = ctx.mod
        return torch.nn.grad.conv2d_input(ctx.shape, m.full(), g, m.stride, m.padding, m.dilation, m.groups), None


class FrozenConv2d(FrozenWeight):
    def __init__(self, conv: nn.Conv2d, mode: str) -> None:
        super().__init__()
        self._init_weight(conv.weight, mode)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone(),
                             persistent=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenConvFn.apply(x, self)


class FrozenAffine(nn.Module):
    """Frozen BatchNorm (eval statistics) as y = a x + b: saves only `a` for the backward pass."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        inv = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
        w = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
        b = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
        self.register_buffer("a", (w * inv).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("b", (b - bn.running_mean.detach().float() * w * inv).reshape(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


def _conv1d_cls() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def freeze_module(module: nn.Module, mode: str) -> nn.Module:
    """Convert a materialised layer into its frozen form at `mode` precision (in place; returns it)."""
    if mode not in FROZEN_DTYPES:
        raise ModelError(f"train.frozen_dtype must be one of {FROZEN_DTYPES}, got {mode!r}")
    conv1d = _conv1d_cls()
    for name, child in list(module.named_children()):
        new: nn.Module | None = None
        if isinstance(child, nn.Linear):
            new = FrozenLinear(child.weight, child.bias, mode)
        elif conv1d is not None and isinstance(child, conv1d):
            new = FrozenLinear(child.weight.t(), child.bias, mode)       # GPT-2 Conv1D stores (in, out)
        elif isinstance(child, nn.Embedding):
            new = FrozenEmbedding(child.weight, mode, child.padding_idx)
        elif isinstance(child, nn.Conv2d):
            new = FrozenConv2d(child, mode)
        elif isinstance(child, nn.BatchNorm2d):
            new = FrozenAffine(child)
        if new is not None:
            setattr(module, name, new)
        else:
            freeze_module(child, mode)
    for k, p in list(module._parameters.items()):
        if p is not None:
            # below fp32 the small leftovers (norm weights) are copied: as views they would pin the whole
            # fp32 blob buffer they came from
            module._parameters[k] = nn.Parameter(p.detach().clone() if mode != "fp32" else p.detach(),
                                                 requires_grad=False)
    if mode != "fp32":
        for k, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[k] = b.clone()
    module.eval()
    return module


def embed_lookup(mod: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, FrozenEmbedding):
        return mod(ids)
    assert isinstance(mod, nn.Embedding)
    return F.embedding(ids, mod.weight, mod.padding_idx)


def embed_as_linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, FrozenEmbedding):
        return mod.as_linear(x)
    assert isinstance(mod, nn.Embedding)
    return F.linear(x, mod.weight)

