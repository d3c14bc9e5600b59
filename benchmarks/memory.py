"""Training memory per node: full fine-tuning vs one snake hop (the paper's 19.37 GB -> 3.13 GB, 6.2x).

Every measurement runs in its own process, through the real engine (`Engine.train_hop`) on a model that
arrives as layer blobs in a store, exactly as a node trains a hop:
    memory = peak RSS during the hop - RSS after imports, before the model is built.
*Full fine-tuning*: fp32 weights, grads and AdamW state, the whole model trainable, KD off.
*Snake hop*: one trainable block (the middle one), every other layer frozen in int8, KD on (teacher = a
copy of the window), frozen suffix checkpointed, LM micro-batches of 1 sequence; same AdamW.
opt-1.3b-arch full fine-tuning is computed analytically (params x 16 B: fp32 weights + grads + 2 Adam
moments, which is exactly the paper's 19.37 GB), never run.
Parts next to the total: weights (trainable fp32 + frozen at their precision), grads, optimizer state and
the KD teacher are computed from parameter counts; "code" is the growth of file-backed resident pages
(library code first run during the hop); "act+other" is the rest of the measured peak (activations, loss
slices, data, allocator overhead). Both modes run with the worker's malloc settings (`tune_malloc`).

    python benchmarks/memory.py [--quick] [--json PATH] [--only smollm2-135m@1,vgg11@64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import prereq

ROOT = Path(__file__).resolve().parents[1]
LMS = {"smollm2-135m", "opt-1.3b-arch"}
FROZEN = "int8"
MiB = 2**20


def configs(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("smollm2-135m", 1), ("vgg11", 64), ("opt-1.3b-arch", 1)]
    return [("smollm2-135m", 1), ("smollm2-135m", 8), ("vgg11", 64), ("opt-1.3b-arch", 1)]


def data_for(model: str) -> dict[str, Any]:
    name, path = ("text", "pydoc") if model in LMS else ("digits32", None)
    return {"name": name, "path": path, "partition": "iid", "shard_index": 0, "shard_count": 1, "seed": 0}


def job_for(model: str, batch: int, mode: str, steps: int) -> dict[str, Any]:
    lm = model in LMS
    train: dict[str, Any] = {"epochs": 1, "batch": batch, "lr": 1e-4, "optimizer": "adamw", "max_steps": steps,
                             "seq_len": 256}
    if mode == "full":
        train.update(frozen_dtype="fp32", checkpoint_frozen=False, micro_batch=0)
        kd = {"mode": "off"}
    else:
        train.update(frozen_dtype=FROZEN, checkpoint_frozen=True, micro_batch=1 if lm else 0)
        kd = {"mode": "on", "alpha": 0.5, "T": 2.0}
    return {"name": f"bench-{model}", "model": model, "model_args": {}, "seed": 0, "train": train, "kd": kd}


# ---------------------------------------------------------------------------------------------- child processes


def rss_file_mb() -> float:
    """File-backed resident memory (code and data pages of the loaded libraries)."""
    from snakenode.train.memory import proc_status_mb

    return proc_status_mb("RssFile")


def child_init(model: str, store: str, out: str) -> None:
    from snakenode.layers.store import LayerStore
    from snakenode.train.engine import Engine
    from snakenode.train.memory import tune_malloc

    tune_malloc()
    eng = Engine(LayerStore(store))
    res = eng.model_init(job_for(model, 1, "full", 1))
    Path(out).write_text(json.dumps(res))


def child_run(model: str, batch: int, mode: str, store: str, state_file: str, out: str, steps: int) -> None:
    import torch

    if model in LMS:
        # code imports are not model memory: load the family's modules before the baseline
        import transformers.models.llama.modeling_llama  # noqa: F401
        import transformers.models.opt.modeling_opt  # noqa: F401

    from snakenode.layers.store import LayerStore
    from snakenode.train import engine as E
    from snakenode.train import memory as MEM

    MEM.tune_malloc()
    torch.set_num_threads(os.cpu_count() or 1)
    init = json.loads(Path(state_file).read_text())
    state, blocks = init["state"], init["blocks"]
    job = job_for(model, batch, mode, steps)
    if mode == "full":
        window, stem, head = [0, blocks], True, True
    else:
        mid = blocks // 2
        window, stem, head = [mid, mid + 1], False, False
    eng = E.Engine(LayerStore(store))
    from snakenode.train import data as D

    D.stats(D.DataSpec.from_dict(data_for(model)))          # data statistics are the daemon's, not the hop's
    base, base_file = MEM.rss_mb(), rss_file_mb()
    t0 = time.monotonic()
    res = eng.train_hop(job, state, window, stem, head, data_for(model), None, None, None, evaluate=False)
    peak = MEM.peak_rss_mb() - base
    code = max(0.0, rss_file_mb() - base_file)         # library pages first touched in the hop (file-backed)
    model_obj = eng.loaded.model if eng.loaded else None
    trainable = frozen = 0
    if model_obj is not None:
        names = set(res["changed"]) | {f"blocks.{i}" for i in range(*window)}
        if stem:
            names.add("stem")
        if head:
            names.add("head")
        for n in model_obj.layer_names():
            cnt = sum(t.numel() for t in model_obj._templates[n].state_dict().values() if t.is_floating_point())
            if n in names:
                trainable += cnt
            else:
                frozen += cnt
    fb = {"fp32": 4, "bf16": 2, "int8": 1}[job["train"]["frozen_dtype"]]
    kd_on = bool(res["kd"]["on"])
    parts = {"weights": (trainable * 4 + frozen * fb) / MiB, "grads": trainable * 4 / MiB,
             "optimizer": trainable * 8 / MiB, "teacher": (trainable * fb if kd_on else 0) / MiB}
    parts["code"] = code
    parts["act+other"] = peak - sum(parts.values())
    Path(out).write_text(json.dumps({"peak_mb": peak, "base_mb": base, "parts": parts, "trainable": trainable,
                                     "frozen": frozen, "kd": kd_on, "steps": res["steps"],
                                     "seconds": time.monotonic() - t0, "window": window,
                                     "samples": res["samples"]}))


# ---------------------------------------------------------------------------------------------- driver


def _spawn(args: list[str], timeout: float) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, timeout=timeout, env=env)


def analytic_params(model: str) -> int:
    from snakenode.train import models as M

    m = M.build_skeleton(M.ModelSpec(model, {}, 0))
    return M.param_count(m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller set (smollm2 batch 1 only), 1 step per run")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--only", default="", help="comma-separated MODEL@BATCH keys")
    ap.add_argument("--store", default="", help="layer store to reuse (default: a temporary one)")
    ap.add_argument("--_init", nargs=3, metavar=("MODEL", "STORE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--_run", nargs=7, metavar=("MODEL", "BATCH", "MODE", "STORE", "STATE", "OUT", "STEPS"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._init:
        child_init(*a._init)
        return 0
    if a._run:
        m, b, mode, store, st, out, steps = a._run
        child_run(m, int(b), mode, store, st, out, int(steps))
        return 0

    steps = 1 if a.quick else 2
    todo = configs(a.quick)
    if a.only:
        keep = set(a.only.split(","))
        todo = [c for c in todo if f"{c[0]}@{c[1]}" in keep]
    if any(model in LMS for model, _ in todo):
        prereq.require_llm("memory.py")
    tmp = Path(tempfile.mkdtemp(prefix="snakenode-bench-"))
    store = a.store or str(tmp / "store")
    results: dict[str, Any] = {"full_mb": {}, "snake_hop_mb": {}, "ratio": {}, "parts": {}, "full_parts": {}, "runs": {},
                               "meta": {"quick": a.quick, "frozen_dtype": FROZEN, "steps": steps,
                                        "threads": os.cpu_count(), "seq_len": 256,
                                        "mmap_threshold": os.environ.get("SNAKENODE_MMAP_THRESHOLD",
                                                                         "engine default (256 KiB)")}}
    try:
        inits: dict[str, str] = {}
        for model, batch in todo:
            key = f"{model}@{batch}"
            if model not in inits:
                inits[model] = str(tmp / f"init-{model}.json")
                t0 = time.monotonic()
                _spawn(["--_init", model, store, inits[model]], 3600)
                print(f"[{model}] model_init {time.monotonic() - t0:.0f}s", file=sys.stderr)
            modes = ["snake"] if model == "opt-1.3b-arch" else ["full", "snake"]
            for mode in modes:
                out = tmp / f"{key}-{mode}.json"
                t0 = time.monotonic()
                _spawn(["--_run", model, str(batch), mode, store, inits[model], str(out), str(steps)], 7200)
                r = json.loads(out.read_text())
                results["runs"][f"{key}/{mode}"] = r
                print(f"[{key}] {mode}: {r['peak_mb']:.0f} MB in {time.monotonic() - t0:.0f}s", file=sys.stderr)
                if mode == "full":
                    results["full_mb"][key] = round(r["peak_mb"], 1)
                    results["full_parts"][key] = {k: round(v, 1) for k, v in r["parts"].items()}
                else:
                    results["snake_hop_mb"][key] = round(r["peak_mb"], 1)
                    results["parts"][key] = {k: round(v, 1) for k, v in r["parts"].items()}
            if model == "opt-1.3b-arch":
                n = analytic_params(model)
                results["full_mb"][key] = round(n * 16 / MiB, 1)
                results["meta"]["opt-1.3b-arch_params"] = n
                results["meta"]["opt-1.3b-arch_full"] = "analytic: params x 16 B (fp32 weights+grads+AdamW)"
            if key in results["full_mb"] and key in results["snake_hop_mb"]:
                results["ratio"][key] = round(results["full_mb"][key] / results["snake_hop_mb"][key], 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


def print_table(r: dict[str, Any]) -> None:
    hdr = (f"{'config':<20} {'full MB':>9} {'snake MB':>9} {'ratio':>6} | {'weights':>8} {'grads':>7} "
           f"{'optim':>7} {'teacher':>8} {'code':>6} {'act+other':>9}")
    print(hdr)
    print("-" * len(hdr))
    for key in r["snake_hop_mb"] | r["full_mb"]:
        p = r["parts"].get(key, {})
        full = r["full_mb"].get(key)
        snake = r["snake_hop_mb"].get(key)
        ratio = r["ratio"].get(key)
        print(f"{key:<20} {full if full is not None else '-':>9} {snake if snake is not None else '-':>9} "
              f"{ratio if ratio is not None else '-':>6} | {p.get('weights', '-'):>8} {p.get('grads', '-'):>7} "
              f"{p.get('optimizer', '-'):>7} {p.get('teacher', '-'):>8} {p.get('code', '-'):>6} "
              f"{p.get('act+other', '-'):>9}")
    print("paper: 19.37 GB -> 3.13 GB (6.2x) for a 1.3B LLM; opt-1.3b-arch full is analytic (params x 16 B)")


if __name__ == "__main__":
    sys.exit(main())
