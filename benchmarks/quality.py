"""Learning quality: the snake against FedAvg and centralised training, in process, at equal client-epochs.

Every system runs the product's own training engine (`Engine.train_hop` over a `LayerStore`, exactly as a
node's worker does), on the same data, partitions and initial weights; no network, no daemons.

- `snake`: the job spec is completed with the product defaults (`snakenode.snake.job.validate_spec`, as
  `snakenode submit` does); the job's state machine (`snake/state.py`: laps, lap rule), next-hop routing
  (`snake/routing.py`: novelty over the nodes' label histograms, with equal compute and link for all) and
  the serpentine window (`snake/window.py`, the job's `window.max_blocks`) decide every hop; each hop is one
  `train_hop` with the job's KD settings. Hop 0 is held by node 0, as with `snakenode demo`.
- `fedavg`: every round each client trains the whole model from the global weights (`train_hop` over all
  layers, KD off, same local epochs, batch, optimiser and lr), then the global model is the average of the
  clients' layers weighted by their training samples (BatchNorm running statistics averaged too).
- `central`: the whole model trained on the union of the nodes' data (`--partition iid --shard 0/1`: every
  non-test item minus a 10% holdout), one epoch per call.

Budgets are counted in *client-epochs*: one snake lap with E local epochs per hop = E (every member trains
E epochs on its data); one FedAvg round with E local epochs = E; one central epoch over the union = 1
(the same samples processed). The metric is accuracy on the fixed 20% test split after every hop / round /
epoch. Output: a table on stdout, `--json PATH` in the schema of issue 12, PNG curves in
out/bench/quality/.

    python benchmarks/quality.py --quick [--json out/bench/quality.json]
    python benchmarks/quality.py --tasks cnn-mnist5k --systems snake --seeds 0 --set kd.alpha=0.7

`--set KEY=VALUE` (repeatable) overrides a job key of the snake (dotted, TOML-style values) to measure one
lever; FedAvg and central are unaffected by it. Diagnostics: `QUALITY_RECAL=1` adds the snake's final test
accuracy with every BatchNorm's statistics recomputed over the union; `QUALITY_ORDER=0,4,1,...` replays a
given sequence of holders (node indices, one per hop; e.g. a real run's) instead of routing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "out" / "bench" / "quality"
NODES = 5
JOB_ID = "9a11e7c0ffee0012"
# FedAvg and central train with plain cross-entropy: no KD, no logit adjustment
PLAIN: dict[str, Any] = {"kd": {"mode": "off", "balance": "none"}}


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    model: str
    model_args: dict[str, Any] = field(default_factory=dict)
    laps: int = 5                 # snake laps = FedAvg rounds (each times `epochs` client-epochs)
    epochs: int = 2               # local epochs per hop / per FedAvg round
    batch: int = 32
    lr: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)     # more job keys (both systems)


TASKS = {
    "cnn-mnist5k": Task("cnn-mnist5k", "mnist5k", "cnn", {}, laps=5, epochs=2),
    # the vs_flower.py quick task: 15 laps/rounds of 1 epoch (its Flower FedAvg numbers compare directly)
    "mlp-digits": Task("mlp-digits", "digits", "mlp", {"hidden": 128, "depth": 4}, laps=15, epochs=1),
    "vgg11-digits32": Task("vgg11-digits32", "digits32", "vgg11", {}, laps=5, epochs=1, batch=64,
                           extra={"train": {"weight_decay": 0.0005}}),
}
QUICK = [("cnn-mnist5k", "dirichlet:0.3"), ("mlp-digits", "dirichlet:0.3")]
FULL = QUICK + [("cnn-mnist5k", "shards:2"), ("vgg11-digits32", "dirichlet:0.3")]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values parse as TOML (strings may be bare)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def job_spec(task: Task, seed: int, over: dict[str, Any], laps: int) -> dict[str, Any]:
    from snakenode.snake import job as job_mod

    raw = {"name": f"quality-{task.name}", "model": task.model, "model_args": dict(task.model_args),
           "dataset": task.dataset, "laps": laps, "seed": seed,
           "train": {"epochs": task.epochs, "batch": task.batch, "lr": task.lr, "optimizer": "sgd",
                     "momentum": 0.9}}
    return job_mod.validate_spec(_merge(_merge(raw, task.extra), over))


def _engine(tmp: str) -> Any:
    import torch

    from snakenode.layers.store import LayerStore
    from snakenode.train.engine import Engine

    torch.set_num_threads(1)
    return Engine(LayerStore(tmp))


def _node_specs(task: Task, partition: str, data_seed: int) -> list[dict[str, Any]]:
    from snakenode.train import data as D

    return [D.DataSpec.from_flags(task.dataset, partition, f"{i}/{NODES}", data_seed).to_dict()
            for i in range(NODES)]


def _test(eng: Any, spec: dict[str, Any], state: dict[str, str], data: dict[str, Any]) -> float:
    return round(float(eng.evaluate(spec, state, data, "test")["accuracy"]), 4)


def _peer_ids() -> list[str]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from snakenode.identity import Identity

    ids = []
    for i in range(NODES):
        seed = hashlib.sha256(f"quality-node-{i}".encode()).digest()
        ids.append(Identity(Ed25519PrivateKey.from_private_bytes(seed)).peer_id)
    return ids


def run_snake(task: Task, partition: str, seed: int, data_seed: int, over: dict[str, Any]) -> dict[str, Any]:
    """The snake as the daemons run it, minus the network: state machine, routing, window, train_hop."""
    from snakenode.snake import routing
    from snakenode.snake import state as st
    from snakenode.train import data as D

    spec = job_spec(task, seed, over, task.laps)
    nodes = _node_specs(task, partition, data_seed)
    with tempfile.TemporaryDirectory(prefix="snakenode-quality-") as tmp:
        eng = _engine(tmp)
        init = eng.model_init(spec)
        state, blocks = init["state"], int(init["blocks"])
        ids = _peer_ids()
        stats = [D.stats(D.DataSpec.from_dict(n)) for n in nodes]
        idle = {"kind": "idle", "job": None, "hop": None}
        cands = [routing.Candidate(pid, {"peer_id": pid, "state": idle, "jobs": [JOB_ID], "memory_mb": 1e6,
                                         "compute": {"samples_per_s": 1.0}, "data": stats[i]}, True, 0.0, 1.0)
                 for i, pid in enumerate(ids)]
        ref = None
        if spec["kd"]["reference"] == "union":
            ref = [float(sum(s["label_hist"][c] for s in stats)) for c in range(len(stats[0]["label_hist"]))]
        w = spec["window"]
        size = min(int(w["max_blocks"]), blocks)
        forced = [int(v) for v in os.environ.get("QUALITY_ORDER", "").split(",") if v]
        S = st.start_job(JOB_ID, ids, ids[forced[0] if forced else 0], size, blocks)
        curve: list[list[float]] = [[0.0, _test(eng, spec, state, nodes[0])]]
        hops = []
        t0 = time.monotonic()
        while True:
            i = ids.index(S.holder)
            out = eng.train_hop(spec, state, [S.window.start, S.window.end], bool(w["train_stem"]),
                                bool(w["train_head"]), nodes[i], ref, evaluate=False)
            state = out["state"]
            x = round((S.hop + 1) / NODES * int(spec["train"]["epochs"]), 4)
            acc = _test(eng, spec, state, nodes[0])
            curve.append([x, acc])
            hops.append({"hop": S.hop, "lap": S.lap, "node": i, "window": [S.window.start, S.window.end],
                         "kd": out["kd"], "test_accuracy": acc})
            S = st.finish_hop(S, metric=None, members=ids)
            if st.job_done(S, spec):
                break
            ranking = routing.rank(spec["routing"], S, S.holder, cands)
            assert ranking.best is not None, ranking
            nxt = ranking.best
            if forced:                  # diagnostic: replay a real run's holders (env QUALITY_ORDER)
                nxt = ids[forced[S.hop + 1]]
            S = st.after_hop(S, nxt, size, spec=spec)
        row = {"system": "snake", "client_epochs": curve[-1][0], "final": {"accuracy": curve[-1][1]},
               "curve": curve, "wall_s": round(time.monotonic() - t0, 1), "hops": hops,
               "local_epochs": int(spec["train"]["epochs"]), "job": {k: spec[k] for k in ("train", "kd", "window")}}
        if os.environ.get("QUALITY_RECAL"):
            row["recalibrated_accuracy"] = recalibrated(eng, spec, state, task, data_seed)
        return row


def recalibrated(eng: Any, spec: dict[str, Any], state: dict[str, str], task: Task, data_seed: int) -> float:
    """Diagnostic (env QUALITY_RECAL=1): test accuracy of the final weights with every BatchNorm layer's
    running statistics recomputed over the union of the nodes' training data. Tells weights from
    statistics; the engine's cached model is dropped afterwards."""
    import torch

    from snakenode.train import data as D

    union = D.DataSpec.from_flags(task.dataset, "iid", "0/1", data_seed)
    lo = eng._ensure(spec, state, set(state), "fp32")
    model = lo.model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    tr = D.load_split(union, "train")
    te = D.load_split(union, "test")
    with torch.no_grad():
        for s in range(0, len(tr), 256):
            model(torch.from_numpy(tr.x[s:s + 256]))
        model.eval()
        pred = torch.cat([model(torch.from_numpy(te.x[s:s + 256])).argmax(-1) for s in range(0, len(te), 256)])
    eng.loaded = None
    return round(float((pred.numpy() == te.y).mean()), 4)


def _average(eng: Any, states: list[dict[str, str]], weights: list[float]) -> dict[str, str]:
    """The weighted average of the clients' layers (every float tensor, BatchNorm statistics included;
    integer counters such as num_batches_tracked take the rounded weighted mean), stored as blobs."""
    import numpy as np

    from snakenode.layers import bundle

    total = float(sum(weights))
    out = {}
    for name in states[0]:
        arrays = [bundle.decode_blob(memoryview(eng.store.get_bytes(s[name])), name) for s in states]
        avg = {}
        for k in arrays[0]:
            acc = sum(a[k].astype(np.float64) * (wt / total) for a, wt in zip(arrays, weights, strict=True))
            dt = arrays[0][k].dtype
            avg[k] = (np.rint(acc) if np.issubdtype(dt, np.integer) else acc).astype(dt)
        out[name] = eng.store.put_bytes(bundle.encode_blob(avg))
    return out


def run_fedavg(task: Task, partition: str, seed: int, data_seed: int, epochs: int | None = None
               ) -> dict[str, Any]:
    from snakenode.train import data as D

    e = epochs or task.epochs
    rounds = task.laps * task.epochs // e
    spec = job_spec(task, seed, {**PLAIN, "train": {"epochs": e}}, rounds)
    nodes = _node_specs(task, partition, data_seed)
    sizes = [float(len(D.node_split(D.DataSpec.from_dict(n)).train)) for n in nodes]
    with tempfile.TemporaryDirectory(prefix="snakenode-quality-") as tmp:
        eng = _engine(tmp)
        init = eng.model_init(spec)
        glob, blocks = init["state"], int(init["blocks"])
        curve: list[list[float]] = [[0.0, _test(eng, spec, glob, nodes[0])]]
        t0 = time.monotonic()
        for r in range(rounds):
            states = [eng.train_hop(spec, glob, [0, blocks], True, True, n, None, evaluate=False)["state"]
                      for n in nodes]
            glob = _average(eng, states, sizes)
            curve.append([float((r + 1) * e), _test(eng, spec, glob, nodes[0])])
        return {"system": "fedavg", "client_epochs": curve[-1][0], "final": {"accuracy": curve[-1][1]},
                "curve": curve, "wall_s": round(time.monotonic() - t0, 1), "local_epochs": e}


def run_central(task: Task, partition: str, seed: int, data_seed: int) -> dict[str, Any]:
    from snakenode.train import data as D

    spec = job_spec(task, seed, {**PLAIN, "train": {"epochs": 1}}, 1)
    union = D.DataSpec.from_flags(task.dataset, "iid", "0/1", data_seed).to_dict()
    with tempfile.TemporaryDirectory(prefix="snakenode-quality-") as tmp:
        eng = _engine(tmp)
        init = eng.model_init(spec)
        state, blocks = init["state"], int(init["blocks"])
        curve: list[list[float]] = [[0.0, _test(eng, spec, state, union)]]
        t0 = time.monotonic()
        for ep in range(task.laps * task.epochs):
            state = eng.train_hop(spec, state, [0, blocks], True, True, union, None, evaluate=False)["state"]
            curve.append([float(ep + 1), _test(eng, spec, state, union)])
        return {"system": "central", "client_epochs": curve[-1][0], "final": {"accuracy": curve[-1][1]},
                "curve": curve, "wall_s": round(time.monotonic() - t0, 1), "local_epochs": 1}


def run_unit(unit: tuple[str, str, str, int, int, dict[str, Any]]) -> dict[str, Any]:
    """One (task, partition, system, seed) run; a separate process per unit when --procs > 1."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    name, partition, system, seed, data_seed, over = unit
    task = TASKS[name]
    if system == "snake":
        row = run_snake(task, partition, seed, data_seed, over)
    elif system == "fedavg":
        row = run_fedavg(task, partition, seed, data_seed)
    elif system == "fedavg-e1":
        row = run_fedavg(task, partition, seed, data_seed, epochs=1)
    elif system == "central":
        row = run_central(task, partition, seed, data_seed)
    else:
        raise SystemExit(f"unknown system {system!r}: snake, fedavg, fedavg-e1 or central")
    row.update({"task": name, "partition": partition, "seed": seed, "data_seed": data_seed})
    if row["system"] == "fedavg" and system == "fedavg-e1":
        row["variant"] = "local epochs 1"
    print(f"[quality] {name} {partition} {system} seed {seed}: {row['final']['accuracy']:.4f} "
          f"({row['wall_s']:.0f}s)", file=sys.stderr, flush=True)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'task':<16} {'partition':<14} {'system':<10} {'E':>2} {'seed':>4} {'client-ep':>9} "
          f"{'final acc':>9} {'best':>6} {'wall s':>7}")
    for r in rows:
        best = max(v for _, v in r["curve"])
        print(f"{r['task']:<16} {r['partition']:<14} {r['system']:<10} {r['local_epochs']:>2} {r['seed']:>4} "
              f"{r['client_epochs']:>9g} {r['final']['accuracy']:>9.4f} {best:>6.3f} {r['wall_s']:>7.0f}")


def plot(rows: list[dict[str, Any]], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for key in sorted({(r["task"], r["partition"]) for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            if (r["task"], r["partition"]) != key:
                continue
            xs, ys = zip(*r["curve"], strict=True)
            label = f"{r['system']} (E={r['local_epochs']}, seed {r['seed']})"
            ax.plot(xs, ys, marker="." if r["system"] != "snake" else None, label=label)
        ax.set_xlabel("client-epochs")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{key[0]}, {key[1]}, {NODES} nodes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out.mkdir(parents=True, exist_ok=True)
        f = out / f"accuracy-{key[0]}-{key[1].replace(':', '')}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(str(f))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="cnn-mnist5k and mlp-digits, dirichlet:0.3, seed 0")
    ap.add_argument("--json", type=Path, help="write the rows and meta here")
    ap.add_argument("--tasks", default="", help="comma list TASK[@PARTITION] (default: --quick's or the full set)")
    ap.add_argument("--systems", default="snake,fedavg,central", help="snake, fedavg, fedavg-e1, central")
    ap.add_argument("--seeds", default="0", help="model seeds (init and shuffling), comma list")
    ap.add_argument("--data-seed", type=int, default=0, help="partition seed (0: the vs_flower.py split)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="snake job override KEY=VALUE")
    ap.add_argument("--procs", type=int, default=1, help="run units in this many processes (1 thread each)")
    ap.add_argument("--plots", type=Path, default=OUT, help="directory for the PNG curves")
    a = ap.parse_args()
    if a.tasks:
        todo = []
        for t in a.tasks.split(","):
            name, _, part = t.partition("@")
            todo.append((name, part or "dirichlet:0.3"))
    else:
        todo = QUICK if a.quick else FULL
    for name, _ in todo:
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    over = parse_sets(a.sets)
    units = [(name, part, system, int(seed), a.data_seed, over)
             for name, part in todo for system in a.systems.split(",") for seed in a.seeds.split(",")]
    t0 = time.monotonic()
    if a.procs > 1:
        with ProcessPoolExecutor(a.procs) as ex:
            rows = list(ex.map(run_unit, units))
    else:
        rows = [run_unit(u) for u in units]
    print_table(rows)
    meta = {"nodes": NODES, "tasks": {n: asdict(TASKS[n]) for n, _ in todo}, "seeds": a.seeds,
            "data_seed": a.data_seed, "snake_overrides": over, "wall_s": round(time.monotonic() - t0, 1),
            "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "client_epochs": "snake lap or FedAvg round with E local epochs = E; one central epoch = 1"}
    meta["plots"] = plot(rows, a.plots)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
