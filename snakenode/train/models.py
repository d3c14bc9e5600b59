"""The model registry: names -> layered models, and their deterministic initial weights (torch; worker only).

A model is named by the job (`model`, `model_args`, `seed`); `build_skeleton` gives it on the meta device
and `materialize` installs one layer at a time from its canonical tensors, trainable in fp32 or frozen
(`frozen.py`). The models themselves live in `layered.py` (the stem/blocks/head contract), `vision.py`
(MLP, CNN, VGG) and `lm.py` (HF causal LMs).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snakenode.train.frozen import freeze_module
from snakenode.train.layered import LayeredModel, ModelError
from snakenode.train.lm import FAMILIES, CausalLM, HFSource, pretrained_layers, smollm2_dir
from snakenode.train.vision import BUILDERS


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
    if spec.name not in BUILDERS:
        raise ModelError(f"unknown model {spec.name!r}; known: {', '.join(MODEL_NAMES)}")
    with torch.device("meta"):
        return BUILDERS[spec.name](spec.args)


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
            yield from pretrained_layers(model, files)
            return
        if model.src.per_layer_init:
            for name in model.layer_names():
                yield name, _per_layer_init(spec, model, name)
            return
        import transformers

        torch.manual_seed(spec.seed)
        hf = getattr(transformers, FAMILIES[model.family][1])(model.config)
        sd = hf.state_dict()
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for hn, ours in model._hf_names.items():
            by_layer.setdefault(ours.split(".")[0] if not ours.startswith("blocks.") else
                                ".".join(ours.split(".")[:2]), {})[ours] = sd[hn]
        for name in model.layer_names():
            yield name, by_layer[name]
        return
    torch.manual_seed(spec.seed)
    real = BUILDERS[spec.name](spec.args)
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
            return next(iter(pretrained_layers(model, files, [name])))[1]
        if model.src.per_layer_init:
            return _per_layer_init(spec, model, name)
    for n, t in initial_layers(spec, model):
        if n == name:
            return t
    raise ModelError(f"no layer {name!r}")


def is_large(model: LayeredModel) -> bool:
    """Built layer by layer (never whole in fp32): pretrained files or per-layer init."""
    return isinstance(model, CausalLM) and (model.src.per_layer_init or bool(model.pretrained_files()))



def param_count(model: LayeredModel) -> int:
    """Parameters and float buffers of the canonical state (a tied head counted once)."""
    total = 0
    for n in model.layer_names():
        sd = model._templates[n].state_dict()
        total += sum(math.prod(sd[t[len(n) + 1:]].shape) for t in model.layer_tensor_names(n)
                     if sd[t[len(n) + 1:]].is_floating_point())
    return total
