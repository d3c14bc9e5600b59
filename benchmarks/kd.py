"""Knowledge distillation against forgetting: sequential window training over non-IID nodes, KD on vs off.

Setup (as issue 3 describes): digits split over 5 nodes with dirichlet:0.3; the snake visits nodes 0..4 in
order for 3 laps; each hop trains a serpentine window of 2 of the MLP's 4 blocks plus stem and head on that
node's data. Each configuration (KD on, KD off) runs in its own process, over several seeds.

Reported per configuration (mean and standard deviation over seeds):
- `test_acc`: final accuracy on the fixed 20% test split;
- `forgetting`: for every node, the best accuracy its own data ever reached after its first visit minus
  the final accuracy on it, averaged over nodes (how much later hops erased what earlier nodes taught);
- `prev_drop`: the accuracy on the previous holder's data lost by each hop, averaged over hops;
- `final_node_acc`: the final model's mean accuracy over all nodes' data.

    python benchmarks/kd.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NODES = 5
LAPS = 3
PARTITION = "dirichlet:0.3"
WINDOW = 2


def run_config(kd_mode: str, seeds: list[int], epochs: int) -> dict[str, Any]:
    import torch

    from snakenode.layers.store import LayerStore
    from snakenode.snake.window import next_window
    from snakenode.train import data as D
    from snakenode.train.engine import Engine

    torch.set_num_threads(1)
    per_seed = []
    for seed in seeds:
        eng = Engine(LayerStore(tempfile.mkdtemp(prefix="snakenode-kd-")))
        job = {"model": "mlp", "model_args": {}, "seed": seed,
               "train": {"epochs": epochs, "batch": 32, "lr": 0.05},
               "kd": {"mode": kd_mode, "alpha": 0.5, "T": 2.0}}
        nodes = [D.DataSpec.from_flags("digits", PARTITION, f"{i}/{NODES}", seed).to_dict() for i in range(NODES)]
        state = eng.model_init(job)["state"]
        blocks = 4
        window = None
        acc_hist: list[list[float]] = []            # after each hop: accuracy on every node's local data
        first_visit: dict[int, int] = {}
        for hop in range(NODES * LAPS):
            node = hop % NODES
            window = next_window(window, WINDOW, blocks)
            out = eng.train_hop(job, state, [window.start, window.end], True, True, nodes[node], None, None, None,
                                evaluate=False)
            state = out["state"]
            first_visit.setdefault(node, hop)
            acc_hist.append([eng.evaluate(job, state, nodes[j], "train")["accuracy"] for j in range(NODES)])
        final = acc_hist[-1]
        forgetting = statistics.mean(max(acc_hist[t][j] for t in range(first_visit[j], len(acc_hist))) - final[j]
                                     for j in range(NODES))
        prev_drop = statistics.mean(acc_hist[h - 1][(h - 1) % NODES] - acc_hist[h][(h - 1) % NODES]
                                    for h in range(1, len(acc_hist)))
        test = eng.evaluate(job, state, nodes[0], "test")["accuracy"]
        per_seed.append({"seed": seed, "test_acc": test, "forgetting": forgetting, "prev_drop": prev_drop,
                         "final_node_acc": statistics.mean(final)})
    summary: dict[str, Any] = {"per_seed": per_seed}
    for key in ("test_acc", "forgetting", "prev_drop", "final_node_acc"):
        vals = [r[key] for r in per_seed]
        summary[key] = round(statistics.mean(vals), 4)
        summary[key + "_sd"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 seeds, 1 local epoch")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--_run", nargs=2, metavar=("KD_MODE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--_seeds", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_epochs", type=int, default=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._run:
        seeds = [int(s) for s in a._seeds.split(",")]
        Path(a._run[1]).write_text(json.dumps(run_config(a._run[0], seeds, a._epochs)))
        return 0
    seeds = [1, 2, 3] if a.quick else [1, 2, 3, 4, 5, 6, 7, 8]
    epochs = 1 if a.quick else 2
    results: dict[str, Any] = {"meta": {"nodes": NODES, "laps": LAPS, "partition": PARTITION, "window": WINDOW,
                                        "model": "mlp (hidden 128, depth 4)", "epochs": epochs, "seeds": seeds,
                                        "kd": {"alpha": 0.5, "T": 2.0}}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "on"):
            out = Path(tmp) / f"{mode}.json"
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            t0 = time.monotonic()
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_run", mode, str(out),
                            "--_seeds", ",".join(map(str, seeds)), "--_epochs", str(epochs)],
                           check=True, env=env, timeout=3600)
            results[f"kd_{mode}"] = json.loads(out.read_text())
            print(f"[kd {mode}] {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print_table(results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


def print_table(r: dict[str, Any]) -> None:
    m = r["meta"]
    print(f"digits, {m['nodes']} nodes {m['partition']}, {m['laps']} laps, window {m['window']}/4 blocks + "
          f"stem/head, {m['epochs']} local epoch(s), {len(m['seeds'])} seeds (mean ± sd)")
    print(f"{'metric':<16} {'KD off':>16} {'KD on':>16}")
    for key, label in (("test_acc", "test accuracy"), ("final_node_acc", "acc. all nodes"),
                       ("forgetting", "forgetting"), ("prev_drop", "prev-node drop")):
        cells = [f"{r[c][key]:.3f} ± {r[c][key + '_sd']:.3f}" for c in ("kd_off", "kd_on")]
        print(f"{label:<16} {cells[0]:>16} {cells[1]:>16}")


if __name__ == "__main__":
    sys.exit(main())
