"""The layered model: `stem`, `blocks[0..M-1]`, `head` (torch; imported only in the worker).

The engine runs a model one layer at a time so it can start from any block, keep the frozen prefix under
no_grad and checkpoint the frozen suffix. Every model is built as a *skeleton* on the meta device and its
layers are materialised one at a time from tensors (a blob, an initialiser or a pretrained file), each
either trainable in fp32 or frozen (see `frozen.py`); `models.py` is the registry that builds them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ModelError(ValueError):
    """An unknown model, bad model_args or a missing model file. The message says what to do."""



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

