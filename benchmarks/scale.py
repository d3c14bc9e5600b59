"""How snakenode's control plane grows with the number of nodes on one machine: N = 8, 16, 32 (`--quick`:
8 and 16) nodes plus a bootstrap peer, each in its own network namespace, product defaults throughout.

Per N:
- converge_s: from the moment every node has written node.json (is listening) until every node holds
  every other node's profile (polled every 0.25 s through the control sockets, as `snakenode peers` does).
- steady-state cost per node per minute, over a fixed window after convergence: the product's own payload
  counters from `status --json` (bytes.gossip.* and bytes.peers.* = gossip; bytes.ping.* = liveness; in +
  out, averaged over nodes) and the wire cost (the veth bytes of every host, bootstrap included, divided by
  N), which adds gossipsub control traffic, Noise/Yamux framing and TCP/IP headers.
- a 1-lap job's wall time: a light model (`mlp`, hidden 32, depth 2) on digits, every node joined, from
  submit to the `job_complete` record.
Workers are started only when needed: each home gets the compute score measured once by this script (as a
node that ran before has it cached), so N workers do not start at once just to benchmark the CPU.

Fit: per-node cost y(N) against c*N; c_max = max y/N (the smallest c with y <= c*N at every measured N) and
the growth exponent k of y ~ N^k (1 = linear).

    python benchmarks/scale.py [--quick] [--json PATH] [--window-s S] [--sizes 8,16,32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import benchlab
import snakerun
from benchlab import BenchError, traffic

from snakenode.snake import job as job_mod

LIGHT_JOB = {"name": "scale-1lap", "model": "mlp", "model_args": {"hidden": 32, "depth": 2}, "dataset": "digits",
             "mode": "p2p", "laps": 1, "seed": 0,
             "train": {"epochs": 1, "batch": 32, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9}}
SETTLE_S = 5.0           # after convergence: the join burst (profiles, peer exchange) is not steady state
CONVERGE_POLL_S = 0.25


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed_compute_cache(homes: list[Path]) -> dict[str, Any]:
    from snakenode.train import capacity

    score = capacity.reference_benchmark(2.0)
    for h in homes:
        (h / "cache").mkdir(parents=True, exist_ok=True)
        (h / "cache" / "compute.json").write_text(json.dumps(score))
    return score


def app_counters(net: snakerun.SnakeNet) -> dict[str, dict[str, int]]:
    return {h: {k: int(v) for k, v in (net.status(h).get("counters") or {}).items() if k.startswith("bytes.")}
            for h in net.nodes}


def per_node_rate(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]], prefixes: tuple[str, ...],
                  minutes: float) -> float:
    vals = []
    for h in a:
        tot = sum(v - a[h].get(k, 0) for k, v in b[h].items() if k.startswith(prefixes))
        vals.append(tot / minutes)
    return sum(vals) / len(vals)


def run_size(n: int, out: Path, window_s: float, job_timeout: float) -> dict[str, Any]:
    root = out / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    nodes = [f"n{i}" for i in range(n)]
    hosts = ["boot", *nodes]
    with benchlab.cluster(root, hosts) as c:
        net = snakerun.SnakeNet(c, f"scale{os.getpid() % 10000}x{n}", nodes)
        for h in nodes:
            (root / h).mkdir(parents=True, exist_ok=True)
        seed_compute_cache([root / h for h in nodes])
        t_launch = time.monotonic()
        net.start("digits", "iid", 0, ready_timeout=60 + 5 * n)
        t_ready = time.monotonic()
        log(f"N={n}: every node listening {t_ready - t_launch:.1f} s after launch")
        try:
            benchlab.wait_for(lambda: c.check_alive() or net.knows_everyone(), 60 + 5 * n,
                              "every node to know every other node's profile")
        except BenchError:
            seen = [len(net.live_peers(h)) for h in nodes]
            err = (f"did not converge within {60 + 5 * n} s of the last node listening; live peers per node "
                   f"min {min(seen)} / median {sorted(seen)[n // 2]} / max {max(seen)} of {n}")
            log(f"N={n}: {err}")
            return {"n": n, "launch_to_listening_s": round(t_ready - t_launch, 2), "converge_s": None,
                    "converge_error": err}
        t_conv = time.monotonic()
        log(f"N={n}: converged {t_conv - t_ready:.1f} s after the last node was listening")
        time.sleep(SETTLE_S)
        a_app, a_wire, t_a = app_counters(net), benchlab.all_link_bytes(c.lab, list(hosts)), time.monotonic()
        time.sleep(window_s)
        b_app, b_wire, t_b = app_counters(net), benchlab.all_link_bytes(c.lab, list(hosts)), time.monotonic()
        minutes = (t_b - t_a) / 60
        wire = traffic(a_wire, b_wire)
        rss = {h: benchlab.tree_rss_mb(p) for h, p in net.pids().items()}
        res: dict[str, Any] = {
            "n": n, "launch_to_listening_s": round(t_ready - t_launch, 2), "converge_s": round(t_conv - t_ready, 2),
            "gossip_bytes_per_min_per_node": round(per_node_rate(a_app, b_app, ("bytes.gossip.", "bytes.peers."),
                                                                 minutes)),
            "ping_bytes_per_min_per_node": round(per_node_rate(a_app, b_app, ("bytes.ping.",), minutes)),
            "wire_bytes_per_min_per_node": round(wire["total"] / minutes / n),
            "window_s": round(t_b - t_a, 1),
            "idle_rss_mb_per_node": round(sum(rss[h] for h in nodes) / n, 1),
            "idle_rss_mb_bootstrap": round(rss["boot"], 1),
        }
        log(f"N={n}: per node per minute: gossip {res['gossip_bytes_per_min_per_node']:,} B, ping "
            f"{res['ping_bytes_per_min_per_node']:,} B, wire {res['wire_bytes_per_min_per_node']:,} B")
        spec = job_mod.validate_spec(LIGHT_JOB)
        t_sub = time.time()
        job_id = net.submit(spec)
        try:
            net.wait_complete(job_id, job_timeout)
        except BenchError as exc:
            # Recorded, not fatal: the control-plane numbers above stand, and how the job failed is a result.
            seen = [len(net.live_peers(h)) for h in nodes]
            res["one_lap_job_s"] = None
            res["one_lap_error"] = (f"not complete after {job_timeout:g} s; live peers per node now "
                                    f"min {min(seen)} / max {max(seen)} of {n}; {str(exc).splitlines()[0]}")
            res["one_lap_hops"] = len(snakerun.trained_hops(net.own_records(job_id)))
            log(f"N={n}: 1-lap job failed: {res['one_lap_error']}")
            return res
        records = net.own_records(job_id)
        done = next(r for r in records if r["event"] == "job_complete")
        hops = snakerun.trained_hops(records)
        res["one_lap_job_s"] = round(done["t"] - t_sub, 2)
        res["one_lap_hops"] = len(hops)
        res["one_lap_test_accuracy"] = ((done.get("detail") or {}).get("test") or {}).get("accuracy")
        log(f"N={n}: 1-lap job {res['one_lap_job_s']} s over {len(hops)} hops")
    return res


def fit(sizes: list[int], ys: list[float]) -> dict[str, Any]:
    if not sizes:   # no N converged: nothing to fit (the JSON still records the failures)
        return {"c_max": None, "c_lsq": None, "growth_exponent": None}
    return {"c_max": round(max(y / x for x, y in zip(sizes, ys, strict=True)), 1),
            "c_lsq": round(benchlab.linear_fit_through_origin([float(s) for s in sizes], ys), 1),
            "growth_exponent": round(benchlab.loglog_slope([float(s) for s in sizes], ys), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 8 and 16 only, shorter windows")
    ap.add_argument("--json", type=Path, help="write the results here (default: print them)")
    ap.add_argument("--out", type=Path, default=benchlab.ROOT / "out" / "bench" / "scale", help="logs and homes")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 8,16,32; quick 8,16)")
    ap.add_argument("--window-s", type=float, default=None, help="steady-state window (default 60 s; quick 30 s)")
    ap.add_argument("--job-timeout", type=float, default=240, help="a 1-lap job not done by then is recorded "
                    "as failed (with how many peers each node still sees)")
    args = ap.parse_args(argv)
    ok, why = benchlab.netns.available()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in (args.sizes or ("8,16" if args.quick else "8,16,32")).split(",")]
    window = args.window_s or (30.0 if args.quick else 60.0)
    rows = []
    try:
        for n in sizes:
            rows.append(run_size(n, args.out, window, args.job_timeout))
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = [r for r in rows if r.get("converge_s") is not None]
    doc: dict[str, Any] = {
        "benchmark": "scale", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": benchlab.machine(), "quick": args.quick, "sizes": sizes, "job": LIGHT_JOB,
        "converge_s": {str(r["n"]): r["converge_s"] for r in rows},
        "gossip_bytes_per_min_per_node": {str(r["n"]): r["gossip_bytes_per_min_per_node"] for r in done},
        "ping_bytes_per_min_per_node": {str(r["n"]): r["ping_bytes_per_min_per_node"] for r in done},
        "wire_bytes_per_min_per_node": {str(r["n"]): r["wire_bytes_per_min_per_node"] for r in done},
        "one_lap_job_s": {str(r["n"]): r["one_lap_job_s"] for r in done},
        "converge_errors": {str(r["n"]): r["converge_error"] for r in rows if r.get("converge_error")},
        "one_lap_errors": {str(r["n"]): r["one_lap_error"] for r in rows if r.get("one_lap_error")},
        "rows": rows,
    }
    fitted = [r["n"] for r in done]
    doc["fit"] = {key: fit(fitted, [float(r[key]) for r in done]) for key in
                  ("gossip_bytes_per_min_per_node", "ping_bytes_per_min_per_node", "wire_bytes_per_min_per_node")}
    g = doc["fit"]["gossip_bytes_per_min_per_node"]
    doc["target"] = {"gossip_per_node_at_most_c_times_n": {"c": g["c_max"], "growth_exponent": g["growth_exponent"],
                                                           "met": g["growth_exponent"] is not None
                                                           and g["growth_exponent"] <= 1.1}}
    benchlab.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
