"""Window training and evaluation (torch; worker only).

A hop trains the window's blocks (plus stem/head when the job says so) with every other layer frozen:
- the frozen prefix before the first trainable layer runs once per batch under no_grad, and its output
  feeds both the student and the KD teacher;
- the teacher is a copy of the *trainable* layers only (at the frozen precision, since it only runs
  forward); for every frozen layer it runs the student's own module, so KD costs the window's weights,
  not a second model;
- frozen layers live at `train.frozen_dtype` (fp32/bf16/int8) and save no activations for their weights;
  `train.checkpoint_frozen` recomputes the frozen suffix in the backward pass instead of storing it;
- LM losses are chunked over tokens so full-vocabulary logits never exist for a whole batch.

The model stays cached between calls while the job's model and the state's hashes match, and layers are
reloaded from the store only when their hash or their required precision changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from snakenode.layers import bundle
from snakenode.layers.store import LayerStore
from snakenode.train import data as D
from snakenode.train import kd as K
from snakenode.train import models as M

EventFn = Callable[[str, dict[str, Any]], None]
LM_EVAL_MAX_SEQS = 64            # cap on validation/test sequences per LM evaluation (CPU time)
OPTIMIZERS = ("sgd", "adam", "adamw")


class EngineError(Exception):
    """A request the engine cannot serve (bad arguments, missing blob, diverged training). `kind` is the
    error kind reported over the worker RPC."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    micro_batch: int = 0
    max_steps: int = 0
    frozen_dtype: str = "fp32"
    checkpoint_frozen: bool = False
    seq_len: int = 128

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> TrainConfig:
        t = job.get("train") or {}
        c = cls(int(t.get("epochs", 1)), int(t.get("batch", 32)), float(t.get("lr", 0.05)),
                str(t.get("optimizer", "sgd")), float(t.get("momentum", 0.9)), float(t.get("weight_decay", 0.0)),
                int(t.get("micro_batch", 0)), int(t.get("max_steps", 0)), str(t.get("frozen_dtype", "fp32")),
                bool(t.get("checkpoint_frozen", False)), int(t.get("seq_len", 128)))
        if c.optimizer not in OPTIMIZERS:
            raise EngineError("bad_job", f"train.optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
        if c.frozen_dtype not in M.FROZEN_DTYPES:
            raise EngineError("bad_job", f"train.frozen_dtype must be one of {M.FROZEN_DTYPES}, got {c.frozen_dtype!r}")
        if c.epochs < 0 or c.batch < 1 or c.micro_batch < 0 or c.seq_len < 2:
            raise EngineError("bad_job", "train.epochs >= 0, train.batch >= 1, train.micro_batch >= 0, "
                                         "train.seq_len >= 2 are required")
        return c

    @property
    def micro(self) -> int:
        return self.batch if self.micro_batch <= 0 else min(self.micro_batch, self.batch)


# ---------------------------------------------------------------------------------------------- memory


def proc_status_mb(field: str = "VmRSS") -> float:
    """A kB field of /proc/self/status in MB (VmRSS: resident memory; RssFile: its file-backed part)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tune_malloc(mmap_threshold: int = 256 * 1024) -> None:
    """glibc raises its mmap threshold dynamically, after which freed multi-MB tensors stay in the heap
    and RSS only grows. A fixed threshold returns big blocks to the OS at free.

    The threshold sits below an LM's per-token-row activations (SmolLM2 at 256 tokens: 256 x 576 fp32 =
    576 KB): heap-allocated activations that outlive the temporaries around them (checkpoint inputs,
    the window's saved tensors) otherwise leave holes the next layer cannot reuse, and the heap grows by
    ~5 MB per layer per pass. Measured on a SmolLM2-135M one-block hop (batch 1 x 256): peak 391-396 MB at
    1 MB, 263 MB at 256 KB, 262 MB at 128 KB, for ~20% more step time (page faults of fresh mappings;
    2.1 -> 2.6 s). Capping glibc's arenas (M_ARENA_MAX=2) gave 311 MB at 1 MB and nothing more at 256 KB.
    SNAKENODE_MMAP_THRESHOLD overrides (bytes; 0 = glibc's dynamic default) to trade memory for speed."""
    env = os.environ.get("SNAKENODE_MMAP_THRESHOLD")
    if env is not None:
        mmap_threshold = int(env)
    if mmap_threshold <= 0:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, int(mmap_threshold))          # M_MMAP_THRESHOLD (also disables the dynamic rule)
    except (OSError, AttributeError):
        pass


def trim_malloc() -> None:
    """Give freed heap pages back to the OS (glibc): loading layers leaves holes that would otherwise
    count as resident memory for the rest of the hop."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each hop reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Batches:
    task: str
    x: torch.Tensor                 # classification: features; lm: token windows (N, seq_len + 1)
    y: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task == "lm":
            w = self.x[idx]
            return w[:, :-1], w[:, 1:]
        assert self.y is not None
        return self.x[idx], self.y[idx]


class Tokenizer:
    """The model's own tokenizer when it ships one (a local HF directory), else UTF-8 bytes."""

    def __init__(self, model: M.LayeredModel) -> None:
        self.hf = None
        self.name = self.name_for(model)
        self.eos: int | None = None
        if self.name != "bytes":
            import transformers

            self.hf = transformers.AutoTokenizer.from_pretrained(self.name[3:])
            self.eos = self.hf.eos_token_id
        if self.hf is None and isinstance(model, M.CausalLM) and model.vocab_size < 256:
            raise EngineError("bad_job", f"the byte-level tokenizer needs vocab_size >= 256, model has "
                                         f"{model.vocab_size}")

    @staticmethod
    def name_for(model: M.LayeredModel) -> str:
        """The tokenizer's name (`hf:DIR` or `bytes`) without loading it."""
        if isinstance(model, M.CausalLM) and model.src.path is not None:
            p = Path(model.src.path)
            if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
                return f"hf:{p}"
        return "bytes"

    def encode(self, text: str) -> np.ndarray:
        if self.hf is None:
            return D.byte_tokens(text)
        return np.asarray(self.hf(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def lm_windows(texts: list[str], tok: Tokenizer, seq_len: int) -> torch.Tensor:
    parts = []
    for t in texts:
        parts.append(tok.encode(t))
        if tok.eos is not None:
            parts.append(np.array([tok.eos], dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    n = len(stream) // (seq_len + 1)
    return torch.from_numpy(stream[:n * (seq_len + 1)].reshape(n, seq_len + 1).copy())


# ---------------------------------------------------------------------------------------------- engine


@dataclass
class Loaded:
    spec: M.ModelSpec
    model: M.LayeredModel
    state: dict[str, str]
    mode: dict[str, str | None]          # None = trainable fp32, else frozen precision


def _rng_seed(*parts: Any) -> int:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class Engine:
    """Serves the worker ops. One model cached at a time (a node trains one hop at a time)."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.loaded: Loaded | None = None
        self._data_cache: dict[Any, Batches] = {}
        self._tok_cache: dict[str, Tokenizer] = {}

    # ------------------------------------------------------------------------------ model state
    def _skeleton(self, spec: M.ModelSpec) -> Loaded:
        if self.loaded is not None and self.loaded.spec == spec:
            return self.loaded
        self.loaded = None                              # free the old model before building the new one
        try:
            model = M.build_skeleton(spec)
        except M.ModelError as e:
            raise EngineError("bad_model", str(e)) from None
        self.loaded = Loaded(spec, model, {}, {})
        return self.loaded

    def model_init(self, job: dict[str, Any]) -> dict[str, Any]:
        spec = M.spec_from_job(job)
        lo = self._skeleton(spec)
        model = lo.model
        layers, state = [], {}
        keep = not (isinstance(model, M.CausalLM) and (model.src.per_layer_init or model.pretrained_files()))
        try:
            for name, tensors in M.initial_layers(spec, model):
                blob = bundle.encode_blob({k: v.detach().contiguous().numpy() for k, v in tensors.items()})
                h = self.store.put_bytes(blob)
                layers.append(bundle.layer_entry(name, blob).to_dict())
                state[name] = h
                if keep:
                    M.materialize(model, name, tensors, None)
                    lo.state[name], lo.mode[name] = h, None
                del blob, tensors
        except M.ModelError as e:
            raise EngineError("bad_model", str(e)) from None
        return {"layers": layers, "blocks": model.num_blocks, "state": state, "params": M.param_count(model)}

    def _load_layer(self, lo: Loaded, name: str, h: str, mode: str | None) -> None:
        if lo.state.get(name) == h and lo.mode.get(name) == mode:
            return
        if lo.state.get(name) == h and lo.mode.get(name) is None and mode is not None:
            M.freeze_module(lo.model.get_layer(name), mode)          # exact fp32 in memory: convert in place
            lo.mode[name] = mode
            return
        if not self.store.has(h):
            raise EngineError("missing_blob", f"layer {name} version {h[:12]} is not in the store; the daemon "
                                              "must fetch it before calling the worker")
        path = self.store.path(h)
        raw = bytearray(path.stat().st_size)
        with open(path, "rb") as f:
            f.readinto(raw)                               # one buffer; the layer's tensors become views of it
        arrays = bundle.decode_blob(memoryview(raw), name)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        try:
            M.materialize(lo.model, name, tensors, mode)
        except M.ModelError as e:
            raise EngineError("bad_state", str(e)) from None
        lo.state[name], lo.mode[name] = h, mode
        del raw, arrays, tensors

    def _ensure(self, job: dict[str, Any], state: dict[str, str], trainable: set[str],
                frozen: str, keep_modes: bool = False) -> Loaded:
        spec = M.spec_from_job(job)
        lo = self._skeleton(spec)
        names = lo.model.layer_names()
        if not isinstance(state, dict) or sorted(state) != sorted(names):
            raise EngineError("bad_state", f"state must map exactly the model's layers {names[:3]}...; got "
                                           f"{sorted(state)[:3] if isinstance(state, dict) else state!r}...")
        # free first (frozen layers shrink), then grow: keeps the peak low when the window moves
        order = sorted(names, key=lambda n: n in trainable)
        loaded = 0
        for name in order:
            if keep_modes and lo.state.get(name) == state[name] and name in lo.mode:
                continue
            before = (lo.state.get(name), lo.mode.get(name, "-"))
            self._load_layer(lo, name, state[name], None if name in trainable else frozen)
            loaded += before != (lo.state.get(name), lo.mode.get(name, "-"))
        if loaded:
            trim_malloc()
        return lo

    # ------------------------------------------------------------------------------ data
    def _batches(self, lo: Loaded, spec: D.DataSpec, split: str, cfg: TrainConfig) -> Batches:
        model = lo.model
        tok_name = Tokenizer.name_for(model) if model.task == "lm" else ""
        key = (spec, split, model.task, tok_name, cfg.seq_len if model.task == "lm" else 0)
        if key in self._data_cache:
            return self._data_cache[key]
        try:
            sd = D.load_split(spec, split)  # type: ignore[arg-type]
        except D.DataError as e:
            raise EngineError("bad_data", str(e)) from None
        if (model.task == "lm") != (sd.task == "lm"):
            raise EngineError("bad_data", f"model {lo.spec.name} is a {model.task} model but --data "
                                          f"{spec.data_flag} is {sd.task} data")
        if sd.task == "lm":
            assert sd.texts is not None
            b = Batches("lm", lm_windows(sd.texts, self._tokenizer(model), cfg.seq_len), None)
            if isinstance(model, M.CausalLM) and len(b) and int(b.x.max()) >= model.vocab_size:
                raise EngineError("bad_data", f"token id {int(b.x.max())} >= vocab_size {model.vocab_size}")
        else:
            assert sd.x is not None and sd.y is not None
            b = Batches("classification", torch.from_numpy(sd.x), torch.from_numpy(sd.y))
        if len(self._data_cache) > 16:
            self._data_cache.clear()
        self._data_cache[key] = b
        return b

    def _release_tokenizers(self) -> None:
        """Drop loaded tokenizers once a hop's batches exist: a 49k BPE holds ~20 MB for the rest of the
        hop otherwise. Token windows stay cached, so a tokenizer is reloaded only for new data."""
        if self._tok_cache:
            self._tok_cache.clear()
            trim_malloc()

    def _tokenizer(self, model: M.LayeredModel) -> Tokenizer:
        k = getattr(getattr(model, "src", None), "path", None) or "bytes"
        if k not in self._tok_cache:
            self._tok_cache[k] = Tokenizer(model)
        return self._tok_cache[k]

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _eval(self, model: M.LayeredModel, b: Batches, batch: int) -> dict[str, Any]:
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

    def evaluate(self, job: dict[str, Any], state: dict[str, str], data: dict[str, Any], split: str
                 ) -> dict[str, Any]:
        if split not in ("val", "test", "train"):
            raise EngineError("bad_args", f"split must be val or test, got {split!r}")
        cfg = TrainConfig.from_job(job)
        spec = self._data_spec(data)
        lo = self._ensure(job, state, set(), cfg.frozen_dtype, keep_modes=True)
        b = self._batches(lo, spec, split, cfg)
        self._release_tokenizers()
        return self._eval(lo.model, b, max(cfg.batch, 64) if b.task != "lm" else cfg.micro)

    @staticmethod
    def _data_spec(data: Any) -> D.DataSpec:
        try:
            return D.DataSpec.from_dict(data)
        except (D.DataError, TypeError) as e:
            raise EngineError("bad_data", str(e)) from None

    # ------------------------------------------------------------------------------ training
    def train_hop(self, job: dict[str, Any], state: dict[str, str], window: list[int], train_stem: bool,
                  train_head: bool, data: dict[str, Any], reference_hist: list[float] | None = None,
                  max_time_s: float | None = None, on_event: EventFn | None = None,
                  evaluate: bool = True, slowdown: float = 1.0) -> dict[str, Any]:
        """One hop. `slowdown` > 1 stretches every step (scenario knob that emulates a slower node)."""
        t_start = time.monotonic()
        reset_peak_rss()
        cfg = TrainConfig.from_job(job)
        try:
            kdc = K.KDConfig.from_job(job)
        except ValueError as e:
            raise EngineError("bad_job", str(e)) from None
        spec = self._data_spec(data)
        lo = self._skeleton(M.spec_from_job(job))
        model = lo.model
        nb = model.num_blocks
        if (not isinstance(window, list | tuple) or len(window) != 2
                or not all(isinstance(v, int) for v in window) or not 0 <= window[0] <= window[1] <= nb):
            raise EngineError("bad_args", f"window must be [start, end) with 0 <= start <= end <= {nb}, got {window!r}")
        trainable = {f"blocks.{i}" for i in range(window[0], window[1])}
        if train_stem:
            trainable.add("stem")
        if train_head:
            trainable.add("head")
        trainable &= set(model.layer_names())
        if not trainable:
            raise EngineError("bad_args", "nothing to train: empty window and stem/head frozen")
        lo = self._ensure(job, state, trainable, cfg.frozen_dtype)
        try:
            train_b = self._batches(lo, spec, "train", cfg)
            val_b = self._batches(lo, spec, "val", cfg)
            self._release_tokenizers()
            eval_batch = max(cfg.batch, 64) if model.task != "lm" else cfg.micro
            skipped = {"loss": None, "samples": 0}
            before = self._eval(model, val_b, eval_batch) if evaluate else skipped

            stats = D.stats(spec)
            kd_on, js = K.kd_decision(kdc, model.task, stats["label_hist"], reference_hist)
            teacher = build_teacher(model, trainable, cfg.frozen_dtype) if kd_on and kdc.alpha > 0 else {}

            order = model.all_layer_names()
            first = min(order.index(n) for n in trainable)
            params = [p for n in sorted(trainable) for p in model.get_layer(n).parameters()]
            opt = self._optimizer(cfg, params)
            for n in order:
                model.get_layer(n).train(n in trainable)

            gen = torch.Generator()
            gen.manual_seed(_rng_seed(lo.spec.seed, sorted(state.items()), list(window), spec.to_dict()))
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
                        loss = self._step_loss(model, x, y, order, first, trainable, teacher, kdc, cfg)
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
                        on_event("step", {"epoch": epoch, "step": steps, "loss": bl / len(idx)})
                        last_event = time.monotonic()
                    if cfg.max_steps and steps >= cfg.max_steps:
                        stopped = "max_steps"
                        break
                    if max_time_s is not None and time.monotonic() - t_start > max_time_s:
                        stopped = "max_time_s"
                        break
                if on_event is not None:
                    on_event("epoch", {"epoch": epoch, "loss": ep_loss / max(ep_count, 1)})
                if stopped:
                    break
            t_train = time.monotonic() - t_train0
            for p in params:
                p.grad = None                                  # grads are not kept between hops
            del opt, teacher
            if job.get("transfer_dtype") == "bf16":
                # The job moves its model in bf16 (bundle.bf16_data_start): the trained layers take their
                # nearest bfloat16 values here, in place, so the hashes name exactly what travels and what
                # this worker keeps in memory.
                with torch.no_grad():
                    for name in trainable:
                        for v in model.layer_state(name).values():
                            if v.dtype == torch.float32:
                                v.copy_(v.to(torch.bfloat16).to(torch.float32))
            after = self._eval(model, val_b, eval_batch) if evaluate else skipped

            new_state = dict(state)
            changed = []
            for name in sorted(trainable):
                tensors = model.layer_state(name)
                arrays = {k: v.contiguous().numpy() for k, v in tensors.items()}
                blob = bundle.encode_blob(arrays)
                try:
                    bundle.check_finite(blob, bundle.parse_header(blob, layer=name), name)
                except bundle.NonFinite as e:
                    self.loaded = None                          # the in-memory model is poisoned; rebuild next time
                    raise EngineError("diverged", f"training diverged ({e}); lower train.lr") from None
                h = self.store.put_bytes(blob)
                if h != state[name]:
                    changed.append(name)
                new_state[name] = h
                lo.state[name] = h
            for name in order:
                model.get_layer(name).eval()
            trim_malloc()
            return {"state": new_state, "changed": changed, "metrics_before": before, "metrics_after": after,
                    "samples": samples, "samples_per_s": samples / t_train if t_train > 0 else 0.0,
                    "peak_rss_mb": peak_rss_mb(), "kd": {"on": bool(teacher_on(kd_on, kdc)), "js": js},
                    "t_train_s": t_train, "steps": steps, "stopped": stopped}
        except BaseException:
            # the trainable layers may have moved in memory: never reuse them under their old hashes
            for name in trainable:
                lo.state.pop(name, None)
                lo.mode.pop(name, None)
            raise

    @staticmethod
    def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    @staticmethod
    def _step_loss(model: M.LayeredModel, x: torch.Tensor, y: torch.Tensor, order: list[str], first: int,
                   trainable: set[str], teacher: dict[str, nn.Module], kdc: K.KDConfig,
                   cfg: TrainConfig) -> torch.Tensor:
        return window_loss(model, x, y, order, first, trainable, teacher, kdc, cfg.checkpoint_frozen)


def build_teacher(model: M.LayeredModel, trainable: set[str], frozen_dtype: str) -> dict[str, nn.Module]:
    """The KD teacher: frozen copies of the trainable layers as they arrived, at the frozen precision.
    Every other layer is shared with the student (passed as None to `model.run`)."""
    return {name: M.freeze_module(copy.deepcopy(model.get_layer(name)), frozen_dtype)
            for name in sorted(trainable)}


def lm_chunk_tokens(model: M.LayeredModel) -> int:
    """Tokens per loss chunk: ~2M logits (8 MB fp32) whatever the vocabulary (env SNAKENODE_LOSS_CHUNK).

    Smaller chunks save memory but dequantise a frozen tied head once more per chunk."""
    vocab = int(getattr(model, "vocab_size", 0) or 256)
    return max(8, min(1024, int(os.environ.get("SNAKENODE_LOSS_CHUNK", 2 * 1024 * 1024)) // vocab))


def teacher_on(kd_on: bool, kdc: K.KDConfig) -> bool:
    return kd_on and kdc.alpha > 0


def window_loss(model: M.LayeredModel, x: torch.Tensor, y: torch.Tensor, order: list[str], first: int,
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


def lm_loss(model: M.LayeredModel, hs: torch.Tensor, y: torch.Tensor, ht: torch.Tensor | None,
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


def default_store(home: str | os.PathLike[str]) -> LayerStore:
    return LayerStore(Path(home) / "store")
