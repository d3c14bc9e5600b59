"""`snakenode demo`: a whole local network (bootstrap + N nodes as real processes on 127.0.0.1), one job.

Every child runs in one process group of its own and gets PR_SET_PDEATHSIG, so nothing survives a Ctrl-C,
a SIGTERM or even a kill -9 of the demo. Node 0 submits the job; the others trust its key. The live view
polls node 0's control socket; the summary, the final model and a report land in the output directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snakenode import control, identity, metric
from snakenode.snake import job as job_mod

PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 60.0


class DemoError(Exception):
    pass


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the demo process dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Network:
    def __init__(self, root: Path, nodes: int, dataset: str, partition: str, mode: str) -> None:
        self.root = root
        self.n = nodes
        self.dataset = dataset
        self.partition = partition
        self.mode = mode
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pgid: int | None = None
        self.homes = [root / f"node{i}" for i in range(nodes)]
        self.boot_home = root / "bootstrap"
        self.coord_home = root / "coordinator"
        self.ids = [identity.load_or_create(h).peer_id for h in self.homes]
        self.network = f"demo{os.getpid() % 100000}"

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SNAKENODE_HOME", None)

        def pre() -> None:
            os.setpgid(0, self.pgid or 0)
            _die_with_parent()

        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pre)  # noqa: PLW1509
        log.close()
        if self.pgid is None:
            self.pgid = p.pid
        self.procs.append(p)
        return p

    def _wait_node_json(self, home: Path, proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoError(f"{what} exited with status {proc.returncode}; see its log in {self.root}")
            try:
                info = json.loads((home / "node.json").read_text())
                if info.get("pid") == proc.pid:
                    return info
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        raise DemoError(f"{what} did not start within {READY_TIMEOUT_S:.0f} s; see its log in {self.root}")

    def start(self) -> None:
        py = sys.executable
        boot = self._spawn([py, "-m", "bootstrap", "--home", str(self.boot_home), "--listen",
                            "/ip4/127.0.0.1/tcp/0", "--network", self.network], "bootstrap.log")
        info = self._wait_node_json(self.boot_home, boot, "the bootstrap peer")
        self.boot_addr = info["addrs"][0]
        submitter = self.ids[0]
        if self.mode == "cs":
            coord = self._spawn([py, "-m", "snakenode.cli", "start", "--home", str(self.coord_home), "--role",
                                 "coordinator", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", self.boot_addr,
                                 "--network", self.network], "coordinator.log")
            self.coord_info = self._wait_node_json(self.coord_home, coord, "the coordinator")
            submitter = self.coord_info["peer_id"]
        for i, home in enumerate(self.homes):
            argv = [py, "-m", "snakenode.cli", "start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
                    "--bootstrap", self.boot_addr, "--network", self.network, "--data", self.dataset,
                    "--partition", self.partition, "--shard", f"{i}/{self.n}", "--seed", "0"]
            if submitter != self.ids[i]:
                argv += ["--trust", submitter]
            if self.mode == "cs":
                argv += ["--coordinator", self.coord_info["addrs"][0]]
            self._spawn(argv, f"node{i}.log")
        for i, home in enumerate(self.homes):
            self._wait_node_json(home, self.procs[-self.n + i], f"node {i}")
        self.submit_home = self.coord_home if self.mode == "cs" else self.homes[0]

    def stop(self) -> None:
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            deadline = time.monotonic() + 6
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=2)

    def wait_converged(self, timeout: float = 60) -> float:
        t0 = time.monotonic()
        everyone = set(self.ids)
        while time.monotonic() - t0 < timeout:
            ok = True
            for home, pid in zip(self.homes, self.ids, strict=True):
                rows = control.call(home, "peers", timeout=2)
                if {r["peer_id"] for r in rows} < everyone - {pid}:
                    ok = False
                    break
            if ok:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise DemoError("the nodes did not discover each other within 60 s; see the logs in " + str(self.root))

    def coordinator_bytes(self) -> int:
        """Bytes the coordinator sent and received (CS mode), all protocols."""
        if self.mode != "cs":
            return 0
        c = control.call(self.coord_home, "status", timeout=2)["counters"]
        return sum(v for k, v in c.items() if k.startswith("bytes.") and (k.endswith(".out") or k.endswith(".in")))

    def per_node_bytes(self) -> dict[str, int]:
        """Bytes each peer sent plus received (all protocols), by name: node0.., bootstrap, coordinator."""
        homes = {f"node{i}": h for i, h in enumerate(self.homes)} | {"bootstrap": self.boot_home}
        if self.mode == "cs":
            homes["coordinator"] = self.coord_home
        out = {}
        for name, home in homes.items():
            try:
                c = control.call(home, "status", timeout=2)["counters"]
            except Exception:  # noqa: BLE001
                continue
            out[name] = sum(v for k, v in c.items() if k.startswith("bytes.") and k.endswith((".in", ".out")))
        return out

    def sent_bytes(self) -> int:
        total = 0
        for home in [*self.homes, self.boot_home] + ([self.coord_home] if self.mode == "cs" else []):
            try:
                c = control.call(home, "status", timeout=2)["counters"]
            except Exception:  # noqa: BLE001 - a node that is gone has nothing more to count
                continue
            total += sum(v for k, v in c.items() if k.startswith("bytes.") and k.endswith(".out"))
        return total


@contextlib.contextmanager
def network(root: Path, nodes: int, dataset: str, partition: str, mode: str) -> Iterator[Network]:
    net = Network(root, nodes, dataset, partition, mode)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        net.start()
        yield net
    finally:
        net.stop()
        signal.signal(signal.SIGTERM, old)


def job_spec(job_file: Path | None, laps: int | None, dataset: str, mode: str) -> dict[str, Any]:
    spec = job_mod.load_spec(job_file) if job_file else job_mod.parse_spec(job_mod.demo_spec_text(), "demo job")
    if laps is not None:
        spec["laps"] = laps
    if job_file is None:
        spec["dataset"] = dataset.split(":")[0] if dataset.split(":")[0] in ("cifar10", "text") else dataset
    return job_mod.validate_spec(spec)


def summarize(detail: dict[str, Any], wall_s: float, bytes_total: int, mode: str) -> dict[str, Any]:
    """The demo's result, from the surviving lineage of the merged hop log."""
    from snakenode.snake import hoplog

    s = detail["summary"]
    c = s.get("completed") or {}
    groups = hoplog.surviving_chain(detail["records"])
    hops = [r for g in groups for r in g if r["event"] == "trained"]
    laps = [r["detail"]["metric"] for g in groups for r in g if r["event"] == "lap_complete"]
    kd_on = sum(1 for h in hops if ((h.get("detail") or {}).get("kd") or {}).get("on"))
    bundles = sum(r["bytes"]["bundle_out"] for r in detail["records"] if r["event"] == "handoff")
    final = metric.of(c.get("test"), job_mod.task(detail["spec"]))
    return {
        "job_id": s["job_id"], "mode": mode, "final_accuracy": (c.get("test") or {}).get("accuracy"),
        "final_test": c.get("test"), "final_metric": final.as_dict(), "laps_completed": c.get("lap", s.get("lap")), "hops": len(hops),
        "blocks": s["blocks"], "windows": [[h["window"]["start"], h["window"]["end"]] for h in hops],
        "kd": {"mode": detail["spec"]["kd"]["mode"], "hops_on": kd_on, "hops_off": len(hops) - kd_on},
        "lap_val_metric": laps, "bytes_total": bytes_total, "bytes_bundles": bundles,
        "wall_s": round(wall_s, 2), "holders": [h["holder"] for h in hops],
        "retries": sum(1 for r in detail["records"] if r["event"] == "retry"),
        "handoff_latency": hoplog.handoff_latency(detail["records"]),
        "bundle_bytes_per_hop": [r["bytes"]["bundle_in"] for g in groups for r in g if r["event"] == "received"
                                 and r["bytes"]["bundle_in"] > 0],
    }


def run_demo(nodes: int, laps: int | None, dataset: str, partition: str, mode: str, job_file: Path | None,
             out: Path | None, as_json: bool, keep: bool, open_browser: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=as_json)
    spec = job_spec(job_file, laps, dataset, mode)
    root = Path(tempfile.mkdtemp(prefix="snakenode-demo-")) if out is None else out
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]snakenode demo[/]: bootstrap + {nodes} nodes on 127.0.0.1, job [cyan]{spec['name']}[/] "
                  f"({spec['model']} on {spec['dataset']}, {spec['laps']} laps, {mode}); files in {root}")
    try:
        with network(root, nodes, dataset, partition, mode) as net:
            t_conv = net.wait_converged()
            console.print(f"all {nodes} nodes see each other ({t_conv:.1f} s)")
            submitter = identity.load(net.submit_home)
            if mode == "cs":
                spec = job_mod.with_mode(spec, "cs", submitter.peer_id)
            signed = job_mod.sign_job(spec, submitter)
            bytes0 = net.sent_bytes()
            coord0 = net.coordinator_bytes()
            per0 = net.per_node_bytes()
            t0 = time.monotonic()
            result = control.call(net.submit_home, "submit", {"job": signed.encode()}, timeout=10)
            job_id = result["job_id"]
            console.print(f"submitted job [bold]{job_id}[/]")
            _show_dashboard(console, net.submit_home, open_browser)
            names = {pid: f"node{i}" for i, pid in enumerate(net.ids)}
            detail: dict[str, Any] = {}
            with Live(console=console, refresh_per_second=4, transient=not as_json) as live:
                while True:
                    detail = control.call(net.submit_home, "job", {"job_id": job_id}, timeout=5)
                    live.update(_live_table(detail, names, time.monotonic() - t0))
                    if detail["summary"]["status"] == "complete":
                        break
                    if time.monotonic() - t0 > 1800:
                        raise DemoError("the job did not complete within 30 minutes")
                    time.sleep(0.25)
            wall = time.monotonic() - t0
            bytes_total = net.sent_bytes() - bytes0
            detail = control.call(net.submit_home, "job", {"job_id": job_id, "collect": True}, timeout=10)
            summary = summarize(detail, wall, bytes_total, mode)
            if mode == "cs":
                summary["bytes_via_coordinator"] = net.coordinator_bytes() - coord0
            per = {k: v - per0.get(k, 0) for k, v in net.per_node_bytes().items()}
            summary["bytes_per_peer"] = per
            summary["bytes_busiest_peer"] = max(per.items(), key=lambda kv: kv[1]) if per else None
            fetched = control.call(net.submit_home, "fetch", {"job_id": job_id,
                                                              "out": str(root / "model.safetensors")}, timeout=120)
            summary["model_path"] = fetched["path"]
            (root / "report.json").write_text(json.dumps({"summary": summary, "records": detail["records"],
                                                          "spec": detail["spec"]}, indent=2, default=str))
            _print_summary(console, summary, detail, names)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every process of the demo was stopped")
        return 130
    except (DemoError, control.ControlError, job_mod.JobSpecError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    if not keep and out is None:
        console.print(f"report, logs and the final model are in {root}")
    return 0


def _show_dashboard(console: Any, home: Path, open_browser: bool) -> None:
    """Print the submitting node's dashboard URL (snakenode/http), and open it in a browser if asked."""
    try:
        url = json.loads((home / "node.json").read_text()).get("http_url")
    except (OSError, json.JSONDecodeError):
        url = None
    if not url:
        return
    console.print(f"dashboard: [link={url}/]{url}/[/link]  (metrics: {url}/metrics)")
    if open_browser:
        import webbrowser

        webbrowser.open(url + "/")


def _live_table(detail: dict[str, Any], names: dict[str, str], elapsed: float) -> Any:
    from rich.table import Table

    s = detail["summary"]
    t = Table(title=f"job {s['job_id']} — {s['status']} — {elapsed:.0f} s")
    recs = detail["records"]
    trained = [r for r in recs if r["event"] == "trained"][-12:]
    key = metric.metric_name(trained[-1].get("metrics_after") if trained else None,
                             job_mod.task(detail["spec"]) if detail.get("spec") else None)
    arrow = "higher is better" if metric.METRICS[key] else "lower is better"
    for col in ("hop", "lap", "holder", "window", f"val {key} before", f"val {key} after", "bundle bytes"):
        t.add_column(col)
    t.caption = f"val = the holder's own validation split; {key}: {arrow}"
    sent = {(r["hop"], r["attempt"]): r["bytes"]["bundle_out"] for r in recs if r["event"] == "handoff"}
    for r in trained:
        w = r["window"]
        mb, ma = r.get("metrics_before") or {}, r.get("metrics_after") or {}
        t.add_row(str(r["hop"]), str(r["lap"]), names.get(r["holder"], r["holder"][-8:]),
                  f"[{w['start']},{w['end']})", f"{mb.get(key, float('nan')):.3f}", f"{ma.get(key, float('nan')):.3f}",
                  str(sent.get((r["hop"] + 1, 0), "")))
    return t


def _print_summary(console: Any, summary: dict[str, Any], detail: dict[str, Any], names: dict[str, str]) -> None:
    from rich.table import Table

    t = Table(title="snakenode demo — summary", show_header=False)
    fm = summary["final_metric"]
    final = metric.Metric(fm["name"], fm["value"], fm["higher_is_better"])
    t.add_row("job", summary["job_id"])
    t.add_row(f"final test {final.label}", final.text())
    for i, m in enumerate(summary["lap_val_metric"]):
        t.add_row(f"lap {i} mean post-hop validation {final.name}", f"{m:.4f}")
    t.add_row("laps / hops", f"{summary['laps_completed']} / {summary['hops']}")
    t.add_row("model depth (blocks)", str(summary["blocks"]))
    t.add_row("windows", " ".join(f"[{a},{b})" for a, b in summary["windows"]))
    t.add_row("path", " -> ".join(names.get(h, h[-6:]) for h in summary["holders"]))
    t.add_row("KD", f"{summary['kd']['mode']}: on in {summary['kd']['hops_on']} of {summary['hops']} hops")
    t.add_row("bundle bytes", f"{summary['bytes_bundles']:,}")
    per_hop = summary.get("bundle_bytes_per_hop") or []
    if per_hop:
        t.add_row("bundle bytes per hop", f"median {sorted(per_hop)[len(per_hop) // 2]:,}, max {max(per_hop):,}")
    lat = summary.get("handoff_latency") or {}
    if lat.get("handoffs"):
        parts = ", ".join(f"{k} {lat[k]['median_s'] * 1000:.0f}" for k in ("decide", "negotiate", "transfer", "load"))
        t.add_row("hand-off latency (median ms)", f"{lat['total']['median_s'] * 1000:.0f} = {parts}")
    t.add_row("all bytes sent (bundles, gossip, pings)", f"{summary['bytes_total']:,}")
    if summary.get("bytes_busiest_peer"):
        name, n = summary["bytes_busiest_peer"]
        t.add_row("busiest peer (in + out)", f"{name}: {n:,}")
    if "bytes_via_coordinator" in summary:
        t.add_row("bytes via the coordinator", f"{summary['bytes_via_coordinator']:,}")
    t.add_row("wall time", f"{summary['wall_s']:.1f} s")
    t.add_row("final model", summary.get("model_path", "-"))
    console.print(t)
