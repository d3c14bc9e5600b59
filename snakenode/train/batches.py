"""Training and evaluation data as tensors: feature/label batches, or token windows for an LM (worker only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from snakenode.train import data as D
from snakenode.train.hopconfig import EngineError
from snakenode.train.layered import LayeredModel
from snakenode.train.lm import CausalLM


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

    def __init__(self, model: LayeredModel) -> None:
        self.hf = None
        self.name = self.name_for(model)
        self.eos: int | None = None
        if self.name != "bytes":
            import transformers

            self.hf = transformers.AutoTokenizer.from_pretrained(self.name[3:])
            self.eos = self.hf.eos_token_id
        if self.hf is None and isinstance(model, CausalLM) and model.vocab_size < 256:
            raise EngineError("bad_job", f"the byte-level tokenizer needs vocab_size >= 256, model has "
                                         f"{model.vocab_size}")

    @staticmethod
    def name_for(model: LayeredModel) -> str:
        """The tokenizer's name (`hf:DIR` or `bytes`) without loading it."""
        if isinstance(model, CausalLM) and model.src.path is not None:
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

