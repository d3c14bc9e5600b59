"""The worker's engine: one cached model, loaded layer by layer from the store, serving the worker ops
`model_init`, `train_hop` and `evaluate` (torch; worker only).

A hop trains the window's blocks (plus stem/head when the job says so) with every other layer frozen at
`train.frozen_dtype` (fp32/bf16/int8; `frozen.py`); the loop is in `training.py`, the losses in `loss.py`,
the KD teacher in `teacher.py` and evaluation in `evaluation.py`.

The model stays cached between calls while the job's model and the state's hashes match, and layers are
reloaded from the store only when their hash or their required precision changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from snakenode.layers import bundle
from snakenode.layers.store import LayerStore
from snakenode.train import data as D
from snakenode.train import kd as K
from snakenode.train import models as M
from snakenode.train.batches import Batches, Tokenizer, lm_windows
from snakenode.train.evaluation import evaluate_model
from snakenode.train.frozen import freeze_module
from snakenode.train.hopconfig import EngineError, TrainConfig
from snakenode.train.layered import LayeredModel, ModelError
from snakenode.train.lm import CausalLM
from snakenode.train.memory import peak_rss_mb, reset_peak_rss, trim_malloc
from snakenode.train.teacher import build_teacher, teacher_on
from snakenode.train.training import EventFn, rng_seed, round_to_bf16, train_window


@dataclass
class Loaded:
    spec: M.ModelSpec
    model: LayeredModel
    state: dict[str, str]
    mode: dict[str, str | None]          # None = trainable fp32, else frozen precision


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
        except ModelError as e:
            raise EngineError("bad_model", str(e)) from None
        self.loaded = Loaded(spec, model, {}, {})
        return self.loaded

    def model_init(self, job: dict[str, Any]) -> dict[str, Any]:
        spec = M.spec_from_job(job)
        lo = self._skeleton(spec)
        model = lo.model
        layers, state = [], {}
        keep = not (isinstance(model, CausalLM) and (model.src.per_layer_init or model.pretrained_files()))
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
        except ModelError as e:
            raise EngineError("bad_model", str(e)) from None
        return {"layers": layers, "blocks": model.num_blocks, "state": state, "params": M.param_count(model)}

    def _load_layer(self, lo: Loaded, name: str, h: str, mode: str | None) -> None:
        if lo.state.get(name) == h and lo.mode.get(name) == mode:
            return
        if lo.state.get(name) == h and lo.mode.get(name) is None and mode is not None:
            freeze_module(lo.model.get_layer(name), mode)          # exact fp32 in memory: convert in place
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
        except ModelError as e:
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
            if isinstance(model, CausalLM) and len(b) and int(b.x.max()) >= model.vocab_size:
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

    def _tokenizer(self, model: LayeredModel) -> Tokenizer:
        k = getattr(getattr(model, "src", None), "path", None) or "bytes"
        if k not in self._tok_cache:
            self._tok_cache[k] = Tokenizer(model)
        return self._tok_cache[k]

    # ------------------------------------------------------------------------------ evaluation

    def evaluate(self, job: dict[str, Any], state: dict[str, str], data: dict[str, Any], split: str
                 ) -> dict[str, Any]:
        if split not in ("val", "test", "train"):
            raise EngineError("bad_args", f"split must be val or test, got {split!r}")
        cfg = TrainConfig.from_job(job)
        spec = self._data_spec(data)
        lo = self._ensure(job, state, set(), cfg.frozen_dtype, keep_modes=True)
        b = self._batches(lo, spec, split, cfg)
        self._release_tokenizers()
        return evaluate_model(lo.model, b, max(cfg.batch, 64) if b.task != "lm" else cfg.micro)

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
            before = evaluate_model(model, val_b, eval_batch) if evaluate else skipped

            stats = D.stats(spec)
            kd_on, js = K.kd_decision(kdc, model.task, stats["label_hist"], reference_hist)
            teacher = build_teacher(model, trainable, cfg.frozen_dtype) if kd_on and kdc.alpha > 0 else {}

            gen = torch.Generator()
            gen.manual_seed(rng_seed(lo.spec.seed, sorted(state.items()), list(window), spec.to_dict()))
            run = train_window(model, train_b, spec, cfg, kdc, trainable, teacher, gen, t_start, max_time_s,
                               on_event, slowdown)
            del teacher
            if job.get("transfer_dtype") == "bf16":
                round_to_bf16(model, trainable)
            after = evaluate_model(model, val_b, eval_batch) if evaluate else skipped

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
            for name in model.all_layer_names():
                model.get_layer(name).eval()
            trim_malloc()
            return {"state": new_state, "changed": changed, "metrics_before": before, "metrics_after": after,
                    "samples": run.samples,
                    "samples_per_s": run.samples / run.t_train_s if run.t_train_s > 0 else 0.0,
                    "peak_rss_mb": peak_rss_mb(), "kd": {"on": bool(teacher_on(kd_on, kdc)), "js": js},
                    "t_train_s": run.t_train_s, "steps": run.steps, "stopped": run.stopped}
        except BaseException:
            # the trainable layers may have moved in memory: never reuse them under their old hashes
            for name in trainable:
                lo.state.pop(name, None)
                lo.mode.pop(name, None)
            raise


def default_store(home: str | os.PathLike[str]) -> LayerStore:
    return LayerStore(Path(home) / "store")
