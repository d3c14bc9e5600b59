"""benchmarks/vs_flower.py compares like with like: the Flower side's task helpers give the snake's partitions,
initial weights and test evaluation exactly, and both systems get the same hyper-parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "flower_app")]

from snakeflower import task as ft  # noqa: E402

from snakenode.layers.store import LayerStore  # noqa: E402
from snakenode.train import data as D  # noqa: E402
from snakenode.train.engine import Engine  # noqa: E402

HOSTS = 5


def test_client_partitions_are_the_nodes_partitions() -> None:
    test_x, test_y = ft.test_arrays("digits")
    seen: list[np.ndarray] = []
    for i in range(HOSTS):
        spec = ft.data_spec("digits", "dirichlet:0.3", i, HOSTS, 0)
        node = D.DataSpec.from_flags("digits", "dirichlet:0.3", f"{i}/{HOSTS}", 0)   # `snakenode start` flags
        assert spec == node
        x, y = ft.train_arrays(spec)
        ref = D.load_split(node, "train")
        assert np.array_equal(x, ref.x) and np.array_equal(y, ref.y)
        split = D.node_split(node)
        assert not set(split.train.tolist()) & set(split.test.tolist()), "a client trains on the test split"
        seen.append(split.train)
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist())), "client partitions overlap"
    assert len(test_y) == 359 and test_x.shape[1:] == (1, 8, 8)          # 20% of 1797, stratified


@pytest.mark.timeout(60)
def test_flower_model_and_evaluation_match_the_engine(tmp_path: Path) -> None:
    import vs_flower

    t = vs_flower.Task()
    spec = vs_flower.snake_spec(t)
    engine = Engine(LayerStore(tmp_path / "store"))
    init = engine.model_init(spec)
    model = ft.build_model(ft.job_like(t.model, t.model_args, t.model_seed))
    # Same initial weights as every snake node builds from the job.
    fresh = Engine(LayerStore(tmp_path / "store"))
    loaded = fresh._ensure(spec, init["state"], set(), "fp32")
    ours = model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(ours[k], v), k
    # Same test evaluation as the engine's (which computes the job's final `test` metric).
    data = {"name": "digits", "path": None, "partition": "iid", "shard_index": 0, "shard_count": 1, "seed": 0}
    want = engine.evaluate(spec, init["state"], data, "test")
    x, y = ft.test_arrays("digits")
    got = ft.evaluate(model, x, y)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # Same local hyper-parameters on both sides.
    fc = vs_flower.flower_config(t, tmp_path / "eval.jsonl")
    tr = spec["train"]
    assert (tr["epochs"], tr["batch"], tr["lr"], tr["momentum"], tr["optimizer"]) == \
        (fc["local-epochs"], fc["batch-size"], fc["lr"], fc["momentum"], "sgd")
    assert spec["laps"] == fc["num-server-rounds"] and spec["model_args"] == t.model_args
