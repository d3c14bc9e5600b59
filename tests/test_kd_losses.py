"""Label skew in a hop: the balanced softmax (train/kd.py, `kd.balance`), by value and in a real engine hop
on a node that lacks most classes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from snakenode.layers import bundle
from snakenode.layers.store import LayerStore
from snakenode.train import data as D
from snakenode.train import engine as E
from snakenode.train import kd as K

pytestmark = pytest.mark.timeout(60)


def _logits(seed: int, rows: int = 6, classes: int = 5) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed))


def test_balanced_softmax_equals_ce_under_a_uniform_histogram() -> None:
    s = _logits(3)
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    prior = K.log_prior([40, 40, 40, 40, 40])
    assert prior is not None
    assert K.kd_loss(s, None, y, 0.0, 1.0, prior=prior).item() == pytest.approx(
        torch.nn.functional.cross_entropy(s, y).item(), abs=1e-6)


def test_balanced_softmax_spares_the_classes_a_node_lacks() -> None:
    """Under a skewed histogram the CE gradient that lowers an absent class's logit shrinks by about its
    (smoothed) frequency: the local loss stops erasing what the node cannot teach."""
    s = torch.zeros(4, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    plain = K.kd_loss(s, None, y, 0.0, 1.0)
    (g_plain,) = torch.autograd.grad(plain, s)
    s2 = torch.zeros(4, 3, requires_grad=True)
    prior = K.log_prior([500, 500, 0])
    balanced = K.kd_loss(s2, None, y, 0.0, 1.0, prior=prior)
    (g_bal,) = torch.autograd.grad(balanced, s2)
    assert g_plain[:, 2].min() > 0.05                                 # plain CE pushes class 2 down
    assert float(g_bal[:, 2].abs().max()) < 0.002                     # the balanced one barely does
    assert prior is not None and float(prior[2]) == pytest.approx(math.log(1 / 1003), abs=1e-5)


def test_log_prior_without_labels_is_none() -> None:
    assert K.log_prior(None) is None
    assert K.log_prior([]) is None
    assert K.log_prior([0, 0]) is None


def test_config_checks_balance() -> None:
    assert K.KDConfig.from_job({"kd": {"balance": "none"}}).balance == "none"
    with pytest.raises(ValueError, match="kd.balance"):
        K.KDConfig.from_job({"kd": {"balance": "yes"}})


# ---------------------------------------------------------------------------------------------- in a hop


def _hop(tmp: Path, train: dict[str, Any], kd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One real engine hop of the digits MLP on a node that holds one or two classes (shards:1 over 10
    nodes); returns the head's tensors before and after, by name."""
    eng = E.Engine(LayerStore(tmp))
    job = {"model": "mlp", "model_args": {"hidden": 32, "depth": 2}, "seed": 3,
           "train": {"epochs": 2, "batch": 32, "lr": 0.05, **train}, "kd": kd}
    state = eng.model_init(job)["state"]
    data = D.DataSpec.from_flags("digits", "shards:1", "0/10", 0).to_dict()
    out = eng.train_hop(job, state, [0, 2], True, True, data, None, evaluate=False)

    def head(s: dict[str, str]) -> dict[str, torch.Tensor]:
        arrays = bundle.decode_blob(eng.store.get_bytes(s["head"]), "head")
        return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}

    return {"before": head(state), "after": head(out["state"])}, D.stats(D.DataSpec.from_dict(data))


def test_balanced_hop_leaves_absent_classes_alone(tmp_path: Path) -> None:
    plain, stats = _hop(tmp_path / "a", {}, {"mode": "off", "balance": "none"})
    bal, _ = _hop(tmp_path / "b", {}, {"mode": "off", "balance": "softmax"})
    absent = [c for c, n in enumerate(stats["label_hist"]) if n == 0]
    assert len(absent) >= 7

    def drop(r: dict[str, dict[str, torch.Tensor]]) -> float:
        return float((r["before"]["head.bias"] - r["after"]["head.bias"])[absent].mean())

    # plain CE drives the absent classes' biases down; the balanced softmax moves them far less
    assert drop(plain) > 0.05
    assert abs(drop(bal)) < drop(plain) / 5

