"""snakenode P2P vs Flower FedAvg, side by side, on the same hosts, data, model and hyper-parameters.

The task (`--quick` is fixed so runs compare): digits with the fixed 20% stratified test split (seed 0),
5 hosts with a dirichlet:0.3 split (seed 0), snakenode's `mlp` (hidden 128: a 64->128 stem, 128->10 head,
and `depth` residual 128->128 blocks between them, the blocks a snake window moves over), one local epoch
per visit, batch 32, SGD lr 0.05 momentum 0.9, target test accuracy 0.85. The budget is the same number of
client-epochs for both: L snake laps (every node trains once per lap) against L FedAvg rounds (every
client trains once per round).

Each system runs alone in its own lab (one network namespace per host on a bridge, the bootstrap peer and
the SuperLink included), never both at once. Bytes are the veth counters of every host, from just before
the job is submitted (`flwr run` is started) to its end; idle traffic is measured separately before the
job, after every node is up and known. Accuracy over time: Flower's ServerApp evaluates the global model on
the test split after every round; for the snake every hop's model is kept from the nodes' checkpoints and
evaluated on the same split afterwards (see snakerun.py). Peak RSS: process trees (a node's daemon and its
worker; a SuperNode and its ClientApp processes) sampled at 5 Hz.

    python benchmarks/vs_flower.py [--quick] [--json PATH] [--out DIR] [--budget L] [--systems a,b]

Needs root (network namespaces) and, once, the package index for the Flower venv (out/venv-flower).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchlab
import flowerrun
import snakerun
from benchlab import BenchError, Sampler, traffic

from snakenode.snake import job as job_mod

TARGET = 0.85
SETTLE_S = 3.0           # after the last node is known, before idle counting: the join burst is not idle
SYSTEMS = ("snake-p2p", "snake-p2p-bf16", "snake-cs", "flower-fedavg")
NOT_RUN = {
    "flower-cyclic": "not run: optional, and Flower 1.41 ships a cyclic strategy only for XGBoost "
                     "(FedXgbCyclic), not for PyTorch models",
}


@dataclass(frozen=True)
class Task:
    name: str = "mlp-digits"
    dataset: str = "digits"
    partition: str = "dirichlet:0.3"
    data_seed: int = 0
    hosts: int = 5
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=lambda: {"hidden": 128, "depth": 4})
    model_seed: int = 0
    epochs: int = 1
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    target: float = TARGET
    budget: int = 15                          # laps = rounds


LARGER = Task(name="cnn-mnist5k", dataset="mnist5k", model="cnn", model_args={}, target=0.85, budget=10)


def snake_spec(task: Task, transfer_dtype: str = "fp32") -> dict[str, Any]:
    """The job: FedAvg's local settings; window, KD, lap and routing keys at the product's defaults. The
    `snake-p2p-bf16` system sets the job's opt-in `transfer_dtype = "bf16"` (trained layers rounded to
    bfloat16 at the end of each hop and moved in half the bytes); the others keep the default fp32."""
    return job_mod.validate_spec({
        "transfer_dtype": transfer_dtype,
        "name": f"vs-flower-{task.name}", "model": task.model, "model_args": dict(task.model_args),
        "dataset": task.dataset, "mode": "p2p", "laps": task.budget, "target_metric": 0.0,
        "seed": task.model_seed,
        "train": {"epochs": task.epochs, "batch": task.batch, "lr": task.lr, "optimizer": "sgd",
                  "momentum": task.momentum},
    })


def flower_config(task: Task, eval_log: Path) -> dict[str, Any]:
    return {"num-server-rounds": task.budget, "num-partitions": task.hosts, "dataset": task.dataset,
            "partition": task.partition, "data-seed": task.data_seed, "model": task.model,
            "model-args": json.dumps(task.model_args), "model-seed": task.model_seed,
            "local-epochs": task.epochs, "batch-size": task.batch, "lr": task.lr, "momentum": task.momentum,
            "eval-log": str(eval_log)}


def log(msg: str) -> None:
    print(f"[vs_flower {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- measures


def idle_rate(c: benchlab.Cluster, hosts: list[str], nodes: int, seconds: float) -> dict[str, Any]:
    """Bytes per second on the wire while nothing trains, per training node (the total, infrastructure
    hosts included, divided by the number of training nodes), plus the per-host rates."""
    time.sleep(SETTLE_S)
    a = benchlab.all_link_bytes(c.lab, list(hosts))
    t0 = time.monotonic()
    time.sleep(seconds)
    b = benchlab.all_link_bytes(c.lab, list(hosts))
    span = time.monotonic() - t0
    tr = traffic(a, b)
    return {"idle_bytes_per_s_per_node": tr["total"] / span / nodes, "idle_s": round(span, 1),
            "idle_bytes_per_s_per_host": {h: round(v / span, 1) for h, v in tr["per_host"].items()}}


def to_target(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluated model at or above the target."""
    return next((p for p in curve if p["accuracy"] >= target), None)


def to_target_sustained(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first model from which every later one stays at or above the target (a stricter reading: both
    systems' curves dip below the target again after first touching it)."""
    hit = None
    for p in curve:
        if p["accuracy"] < target:
            hit = None
        elif hit is None:
            hit = p
    return hit


def summarize(curve: list[dict[str, Any]], s0: benchlab.Sample, s_end: benchlab.Sample, sampler: Sampler,
              nodes: list[str], target: float, t_end: float) -> dict[str, Any]:
    tr = traffic(s0, s_end)
    hit = to_target(curve, target)
    kept = to_target_sustained(curve, target)
    peaks = sampler.peak_rss(s0.t, s_end.t)
    return {
        "bytes_to_target_sustained": None if kept is None else kept["bytes"],
        "wall_s_to_target_sustained": None if kept is None else round(kept["t"], 2),
        "bytes_total": tr["total"], "bytes_busiest_host": tr["busiest_bytes"], "busiest_host": tr["busiest_host"],
        "bytes_per_host": tr["per_host"],
        "bytes_to_target": None if hit is None else hit["bytes"],
        "wall_s_to_target": None if hit is None else round(hit["t"], 2),
        "wall_s": round(t_end - s0.t, 2),
        "peak_rss_mb": round(max(peaks.get(h, 0.0) for h in nodes), 1),
        "peak_rss_mb_per_host": {h: round(v, 1) for h, v in peaks.items()},
        "final_accuracy": curve[-1]["accuracy"] if curve else None,
        "best_accuracy": max((p["accuracy"] for p in curve), default=None),
        "reached_target": hit is not None,
        "curve": curve,
    }


# ---------------------------------------------------------------------------------------------- systems


def run_snake(task: Task, out: Path, idle_s: float, timeout: float, cs: bool = False, bf16: bool = False
              ) -> dict[str, Any]:
    """snake-p2p, or with `cs` snake-cs: the same nodes plus a coordinator peer on a host of its own that
    plans every hop and relays every bundle (the job is submitted on the coordinator)."""
    from snakeflower import task as ft

    name = "snake-cs" if cs else "snake-p2p-bf16" if bf16 else "snake-p2p"
    root = out / f"{name}-{task.name}"
    shutil.rmtree(root, ignore_errors=True)
    nodes = [f"n{i}" for i in range(task.hosts)]
    hosts = ["boot", *(["coord"] if cs else []), *nodes]
    spec = snake_spec(task, "bf16" if bf16 else "fp32")
    with benchlab.cluster(root, hosts) as c:
        net = snakerun.SnakeNet(c, f"vsf{os.getpid() % 100000}", nodes, coordinator="coord" if cs else None)
        log(f"{name}: starting a bootstrap peer{', a coordinator' if cs else ''} and {len(nodes)} nodes "
            f"in namespaces ({root})")
        net.start(task.dataset, task.partition, task.data_seed)
        conv = net.wait_converged(180, need_compute=True)
        log(f"{name}: every node knows every other node's profile ({conv:.1f} s); idle for {idle_s:g} s")
        idle = idle_rate(c, hosts, len(nodes), idle_s)
        idle_rss = {h: round(benchlab.tree_rss_mb(p), 1) for h, p in net.pids().items()}
        archive = snakerun.HopArchive(net, root / "archive").start()
        with Sampler(c.lab, hosts, net.pids, 0.2) as sampler:
            app0 = app_bytes(net)
            s0 = sampler.take()
            job_id = net.submit(spec)
            archive.job_id = job_id
            log(f"{name}: submitted job {job_id} ({task.budget} laps)")
            detail = net.wait_complete(job_id, timeout)
            s_end = sampler.take()
            app1 = app_bytes(net)
            archive.stop()
        records = net.own_records(job_id)
        gossip_view = {(r["event"], r["hop"], r["attempt"]) for r in detail["records"]}
        (root / "records.json").write_text(json.dumps(records, indent=1, default=str))
    done = next(r for r in records if r["event"] == "job_complete")
    hops = snakerun.trained_hops(records)
    log(f"{name}: job complete after {len(hops)} hops; evaluating every hop's model on the test split")
    curve = [_initial_point(ft, task)]
    for p in snakerun.evaluate_hops(spec, archive, hops, task.dataset):
        curve.append({"t": round(p["t"] - s0.t, 3), "bytes": traffic(s0, sampler.at(p["t"]))["total"],
                      "accuracy": p["accuracy"], "loss": p["loss"], "hop": p["hop"], "lap": p["lap"],
                      "window": [p["window"]["start"], p["window"]["end"]]})
    res = summarize(curve, s0, s_end, sampler, nodes, task.target, done["t"])
    res.update(idle)
    res["idle_rss_mb_per_host"] = idle_rss
    res["final_test_reported_by_job"] = (done.get("detail") or {}).get("test")
    res["hops"] = len(hops)
    res["laps"] = done["lap"]
    res["retries"] = sum(1 for r in records if r["event"] == "retry")
    res["bytes_bundles"] = sum(r["bytes"]["bundle_out"] for r in records if r["event"] == "handoff")
    res["bytes_not_bundles"] = res["bytes_total"] - res["bytes_bundles"]
    res["kd_on_hops"] = sum(1 for r in hops if ((r.get("detail") or {}).get("kd") or {}).get("on"))
    res["job_id"] = job_id
    res["records_missing_from_submitters_view"] = sorted(
        f"{e}@{h}" for e, h, a in {(r["event"], r["hop"], r["attempt"]) for r in records} - gossip_view)
    res["app_bytes_during_job"] = {k: app1.get(k, 0) - app0.get(k, 0) for k in sorted(app1)
                                   if app1.get(k, 0) != app0.get(k, 0)}
    res["sampler_errors"] = sampler.errors[:5]
    res["archive_missing"] = archive.missing[:5]
    return res


def app_bytes(net: snakerun.SnakeNet) -> dict[str, int]:
    """The product's own byte counters (payload by subsystem, `status --json`), summed over the nodes."""
    total: dict[str, int] = {}
    for h in net.daemons:
        for k, v in (net.status(h).get("counters") or {}).items():
            if k.startswith("bytes."):
                total[k] = total.get(k, 0) + int(v)
    return total


def _initial_point(ft: Any, task: Task) -> dict[str, Any]:
    """The untrained model's accuracy (both systems start from the same initial weights)."""
    x, y = ft.test_arrays(task.dataset)
    m = ft.evaluate(ft.build_model(ft.job_like(task.model, task.model_args, task.model_seed)), x, y)
    return {"t": 0.0, "bytes": 0, "accuracy": m["accuracy"], "loss": m["loss"], "hop": -1}


def run_flower(task: Task, out: Path, bin_dir: Path, idle_s: float, timeout: float) -> dict[str, Any]:
    root = out / f"flower-fedavg-{task.name}"
    shutil.rmtree(root, ignore_errors=True)
    clients = [f"c{i}" for i in range(task.hosts)]
    hosts = ["link", *clients]
    with benchlab.cluster(root, hosts) as c:
        fnet = flowerrun.FlowerNet(c, bin_dir, clients)
        log(f"flower: starting a SuperLink and {len(clients)} SuperNodes in namespaces ({root})")
        fnet.start()
        log(f"flower: every SuperNode is online; idle for {idle_s:g} s")
        idle = idle_rate(c, hosts, len(clients), idle_s)
        idle_rss = {h: round(benchlab.tree_rss_mb(p), 1) for h, p in fnet.pids().items()}
        eval_log = root / "eval.jsonl"
        with Sampler(c.lab, hosts, fnet.pids, 0.2) as sampler:
            s0 = sampler.take()
            log(f"flower: flwr run ({task.budget} rounds of FedAvg)")
            _, t_end, _ = fnet.run(flower_config(task, eval_log), timeout)
            s_end = sampler.take()
    evals = [json.loads(line) for line in eval_log.read_text().splitlines() if line.strip()]
    curve = []
    for e in evals:
        t = e["t"] if e["round"] else s0.t            # round 0 = the initial model, before anything moved
        curve.append({"t": round(t - s0.t, 3), "bytes": traffic(s0, sampler.at(t))["total"] if e["round"] else 0,
                      "accuracy": e["accuracy"], "loss": e["loss"], "round": e["round"]})
    res = summarize(curve, s0, s_end, sampler, clients, task.target, t_end)
    res.update(idle)
    res["idle_rss_mb_per_host"] = idle_rss
    res["rounds"] = max((e["round"] for e in evals), default=0)
    res["sampler_errors"] = sampler.errors[:5]
    return res


# ---------------------------------------------------------------------------------------------- report


def compare(systems: dict[str, dict[str, Any]], snake: str = "snake-p2p") -> dict[str, Any]:
    """The issue's targets: snake bytes to target <= 1/3 of FedAvg's, wall time to target <= 1/5."""
    s, f = systems.get(snake), systems.get("flower-fedavg")
    if not s or not f:
        return {}
    out: dict[str, Any] = {}
    for key, limit in (("bytes_to_target", 1 / 3), ("wall_s_to_target", 1 / 5),
                       ("bytes_to_target_sustained", 1 / 3), ("wall_s_to_target_sustained", 1 / 5)):
        a, b = s.get(key), f.get(key)
        ratio = a / b if a is not None and b else None
        out[key] = {"snake": a, "fedavg": b, "ratio": None if ratio is None else round(ratio, 4),
                    "limit": round(limit, 4), "met": ratio is not None and ratio <= limit}
    for key in ("bytes_total", "wall_s"):
        a, b = s.get(key), f.get(key)
        out[key] = {"snake": a, "fedavg": b, "ratio": round(a / b, 4) if a and b else None}
    return out


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results["systems"].items():
        curve = r.get("curve") or []
        axes[0].plot([p["t"] for p in curve], [p["accuracy"] for p in curve], marker=".", label=name)
        axes[1].plot([p["bytes"] / 1e6 for p in curve], [p["accuracy"] for p in curve], marker=".", label=name)
    for ax, xl in zip(axes, ("wall time since submit (s)", "bytes on the wire since submit (MB)"), strict=True):
        ax.axhline(results["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_task(task: Task, systems: list[str], out: Path, bin_dir: Path | None, idle_s: float,
             timeout: float) -> dict[str, Any]:
    res: dict[str, Any] = {"task": asdict(task), "target_accuracy": task.target, "systems": {}}
    for name in systems:
        if name in ("snake-p2p", "snake-p2p-bf16", "snake-cs"):
            res["systems"][name] = run_snake(task, out, idle_s, timeout, cs=name == "snake-cs",
                                             bf16=name == "snake-p2p-bf16")
        elif name == "flower-fedavg":
            assert bin_dir is not None
            res["systems"][name] = run_flower(task, out, bin_dir, idle_s, timeout)
        r = res["systems"][name]
        log(f"{name}: final accuracy {r['final_accuracy']:.4f}, {r['bytes_total']:,} bytes, {r['wall_s']} s; "
            f"to target {task.target}: {r['wall_s_to_target']} s, {r['bytes_to_target']} bytes")
    res["comparison"] = compare(res["systems"])
    if "snake-cs" in res["systems"]:
        res["comparison_cs"] = compare(res["systems"], "snake-cs")
    if "snake-p2p-bf16" in res["systems"]:
        res["comparison_bf16"] = compare(res["systems"], "snake-p2p-bf16")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the fixed mlp-digits task only")
    ap.add_argument("--json", type=Path, help="write the results here (default: print them)")
    ap.add_argument("--out", type=Path, default=benchlab.ROOT / "out" / "bench" / "vs_flower",
                    help="logs, node homes, the accuracy curves (PNG)")
    ap.add_argument("--venv", type=Path, default=benchlab.ROOT / "out" / "venv-flower",
                    help="Flower's own venv (created when missing)")
    ap.add_argument("--budget", type=int, default=None, help="laps = rounds (default 15; 25 in the full run)")
    ap.add_argument("--idle-s", type=float, default=None, help="idle measurement window (default 20 s; 60 s full)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    ap.add_argument("--timeout", type=float, default=1800, help="per-job limit in seconds")
    args = ap.parse_args(argv)
    ok, why = benchlab.netns.available()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"error: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    budget = args.budget or (15 if args.quick else 25)
    idle_s = args.idle_s or (20.0 if args.quick else 60.0)
    sys.path.insert(0, str(flowerrun.APP_DIR))
    try:
        bin_dir = flowerrun.ensure_venv(args.venv) if "flower-fedavg" in systems else None
        args.out.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {"benchmark": "vs_flower", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                               "machine": benchlab.machine(), "quick": args.quick, "flower": flowerrun.FLWR_PIN}
        main_task = Task(budget=budget)
        doc.update(run_task(main_task, systems, args.out, bin_dir, idle_s, args.timeout))
        doc["not_run"] = dict(NOT_RUN)
        plot(doc, args.out / f"accuracy-{main_task.name}.png", f"{main_task.name}: snakenode P2P vs Flower FedAvg")
        doc["plots"] = [str(args.out / f"accuracy-{main_task.name}.png")]
        if not args.quick:
            larger = Task(**{**asdict(LARGER), "budget": args.budget or LARGER.budget})
            doc["larger"] = run_task(larger, systems, args.out, bin_dir, idle_s, args.timeout)
            plot(doc["larger"], args.out / f"accuracy-{larger.name}.png", f"{larger.name}: snakenode P2P vs Flower FedAvg")
            doc["plots"].append(str(args.out / f"accuracy-{larger.name}.png"))
    except (BenchError, job_mod.JobSpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    benchlab.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
