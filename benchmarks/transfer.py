"""Bundle transfer throughput and CPU cost: our libp2p path vs plain TCP vs the fast bulk lane, in one run.

For each bundle size (10, 100, 500 MB; `--quick`: 10 and 100 MB) and each path, a sender and a receiver run
as two separate processes on 127.0.0.1 and move a real bundle (safetensors layers of float32, 4-16 layers)
with the product's code:
- `libp2p`: two libp2p hosts (TCP + Noise + Yamux, snakenode.net.host), transfer.send_bundle on a
  `/snake/bundle/1.0.0` stream, transfer.receive_layers on the other side (connection set up beforehand,
  as between two daemons that know each other; opening the stream is timed);
- `tcp`: the lane's own code path without encryption (LaneServer / send_over_lane with
  plaintext_for_benchmark: the same frames, the same per-layer sha256 and verification, the same partial
  files, blocking sockets in a worker thread, 1 MiB writes), so lane/tcp is what the security costs;
- `lane`: the fast bulk lane (TLS 1.3, both certificates pinned; connect + handshake + hello are timed,
  certificate generation is not: it happens at Propose/Accept time).
The receiver writes into a fresh layer store (partial files, fsync per layer, verification, commit) and
checks that every layer arrived; each side reports `time.process_time()` (all threads) over the transfer.

Reported per PATH@SIZE: throughput in MB/s (10^6 bytes of bundle payload per second of the sender's wall
time, from opening the stream or connection to the receiver's ack; median of the repetitions) and CPU
seconds per 100 MB on each side, with the machine's load before and after (`contention`). `--json`
writes {"throughput_mb_s": {"PATH@SIZE": x}, "cpu_s_per_100mb": {"sender": {...}, "receiver": {...}},
"lane_vs_tcp": {...}, "target": {...}, "contention": {...}, "runs": [...], ...}.

    python benchmarks/transfer.py [--quick] [--json PATH] [--sizes 10,100,500] [--reps N] [--store DIR]
Run it under the shared lock: flock /tmp/snakenode-heavy.lock python benchmarks/transfer.py ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlab

from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore

PATHS = ("libp2p", "tcp", "lane")
LAYERS = {10: 4, 100: 8, 500: 16}  # a 1.3B model has tens of layers of tens of MB: keep layers realistic
TARGET_RATIO = 0.7
RUN_TIMEOUT_S = 300.0


def log(msg: str) -> None:
    print(f"[transfer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================================ bundles


def contention() -> dict[str, Any]:
    """Load average and CPU pressure (PSI, where the kernel has it): throughput on a shared 2-core machine
    means little if other work competed for the cores, so every result carries this."""
    out: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2)}
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        out["cpu_pressure_some_avg10"] = float(some[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def make_bundle(src: Path, size_mb: int) -> list[dict[str, Any]]:
    """Layers of about size_mb/L MB each in the source store; returns their schema entries (cached)."""
    import numpy as np

    index = src / f"bundle-{size_mb}MB.json"
    store = LayerStore(src / "store")
    if index.exists():
        entries = json.loads(index.read_text())
        if all(store.has(e["hash"]) for e in entries):
            return entries
    n = LAYERS.get(size_mb, max(1, size_mb // 32))
    floats = size_mb * 10**6 // n // 4
    rng = np.random.default_rng(size_mb)
    entries = []
    for i in range(n):
        name = f"blocks.{i}"
        blob = bundle_mod.encode_blob({f"{name}.weight": rng.standard_normal(floats, dtype=np.float32)})
        store.put_bytes(blob)
        entries.append(bundle_mod.layer_entry(name, blob).to_dict())
        del blob
    index.write_text(json.dumps(entries))
    return entries


# ============================================================================================ roles (subprocesses)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _read_line() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the orchestrator went away")
    return json.loads(line)


def _offer_json(offer: Any) -> dict[str, Any]:
    return {"port": offer.port, "id": offer.lane_id, "token": offer.token.hex(), "cert": offer.cert.hex()}


async def role_receiver(path: str, src: Path, dst: Path, size_mb: int) -> None:
    import trio

    from snakenode import identity, logs, wire
    from snakenode.counters import Counters
    from snakenode.net import host as host_mod
    from snakenode.net import lane, transfer

    logs.setup("warning")
    entries = [bundle_mod.LayerEntry.from_dict(e) for e in json.loads((src / f"bundle-{size_mb}MB.json").read_text())]
    schema = {e.name: e for e in entries}
    store = LayerStore(dst / "store")
    counters = Counters()
    done = trio.Event()
    result: dict[str, Any] = {}

    async def handle(io: Any) -> None:
        try:
            kind, f = await io.read_frame(limit=bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024)
            if kind != "bundle":
                raise wire.WireError(f"expected bundle, got {kind!r}", "unexpected")
            incoming = transfer.decode_incoming(f)
            incoming.manifest.check_against(schema)
            n = await lane.receive_layers(io, incoming, schema, store)
            result["received"] = n
            result["complete"] = all(store.has(e.hash) for e in entries)
            await io.write_frame({"t": "ack", "bytes": n})
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            result["cpu_s"] = time.process_time() - cpu0
            done.set()

    hello = _read_line()  # the sender's certificate (lane) or peer id (libp2p)
    cpu0 = time.process_time()
    if path == "libp2p":
        host = host_mod.build_host(identity.load_or_create(dst / "home"), 8)
        async with host.run(listen_addrs=host_mod.listen_addrs(["/ip4/127.0.0.1/tcp/0"])):
            host_mod.register(host, wire.PROTO_BUNDLE, "bundle", handle, counters, allowed=lambda _: True)
            cpu0 = time.process_time()
            _emit({"maddr": host_mod.dialable_addrs(host)[0]})
            with trio.fail_after(RUN_TIMEOUT_S):
                await done.wait()
    else:
        srv = lane.LaneServer(counters, host="127.0.0.1", plaintext_for_benchmark=path == "tcp")
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.serve)
            offer = srv.expect("sender", bytes.fromhex(hello["cert"]), handle, ttl=RUN_TIMEOUT_S)
            cpu0 = time.process_time()
            _emit({"offer": _offer_json(offer)})
            with trio.fail_after(RUN_TIMEOUT_S):
                await done.wait()
            nursery.cancel_scope.cancel()
    _emit(result)


async def role_sender(path: str, src: Path, tmp: Path, size_mb: int) -> None:

    from snakenode import identity, logs, wire
    from snakenode.counters import Counters
    from snakenode.net import host as host_mod
    from snakenode.net import lane, transfer

    logs.setup("warning")
    entries = [bundle_mod.LayerEntry.from_dict(e) for e in json.loads((src / f"bundle-{size_mb}MB.json").read_text())]
    store = LayerStore(src / "store")
    manifest = bundle_mod.LayerBundle("0123456789abcdef", {"hop": 1}, entries)
    items = transfer.plan_send(entries, set(), {})
    counters = Counters()
    cert = lane.LaneCert.generate()
    _emit({"cert": cert.der.hex()})
    ready = _read_line()
    if path == "libp2p":
        from libp2p.peer.peerinfo import info_from_p2p_addr

        host = host_mod.build_host(identity.load_or_create(tmp / "home"), 8)
        async with host.run(listen_addrs=host_mod.listen_addrs(["/ip4/127.0.0.1/tcp/0"])):
            info = info_from_p2p_addr(host_mod.listen_addrs([ready["maddr"]])[0])
            await host.connect(info)
            t0, cpu0 = time.monotonic(), time.process_time()
            io = await host_mod.open_stream(host, info.peer_id.to_string(), wire.PROTO_BUNDLE, counters, "bundle")
            res = await transfer.send_bundle(io, manifest, store, items)
            await io.close()
            seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
    else:
        o = ready["offer"]
        offer = lane.LaneOffer(o["port"], o["id"], bytes.fromhex(o["token"]), bytes.fromhex(o["cert"]))
        t0, cpu0 = time.monotonic(), time.process_time()
        res = await lane.send_over_lane(["127.0.0.1"], offer, cert, manifest, store, items, counters=counters,
                                        plaintext_for_benchmark=path == "tcp")
        seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
        if res["path"] != "lane":
            raise SystemExit(f"the {path} run fell back to {res['path']}")
    _emit({"bytes": res["bytes"], "seconds": seconds, "cpu_s": cpu})


# ============================================================================================ orchestration


def _readline(proc: subprocess.Popen[str], who: str, deadline: float) -> dict[str, Any]:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(timeout=left):
            raise TimeoutError(f"{who} gave no answer in time")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{who} exited ({proc.wait()}) without an answer")
        if line.startswith("{"):
            return json.loads(line)


def run_one(path: str, size_mb: int, src: Path, work: Path) -> dict[str, Any]:
    dst = Path(tempfile.mkdtemp(prefix=f"{path}-{size_mb}-", dir=work))
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--path", path, "--size", str(size_mb), "--src", str(src), "--dst", str(dst)]
    env = {**os.environ, "PYTHONPATH": str(benchlab.ROOT)}
    rx = subprocess.Popen([*me, "--role", "recv", *common], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=open(dst / "recv.log", "w"), text=True, env=env)  # noqa: SIM115
    tx = subprocess.Popen([*me, "--role", "send", *common], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=open(dst / "send.log", "w"), text=True, env=env)  # noqa: SIM115
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        assert rx.stdin is not None and tx.stdin is not None
        rx.stdin.write(json.dumps(_readline(tx, "sender", deadline)) + "\n")
        rx.stdin.flush()
        tx.stdin.write(json.dumps(_readline(rx, "receiver", deadline)) + "\n")
        tx.stdin.flush()
        sent = _readline(tx, "sender", deadline)
        got = _readline(rx, "receiver", deadline)
    except (TimeoutError, RuntimeError) as exc:
        logs = "\n".join(f"--- {n}\n" + (dst / n).read_text()[-2000:] for n in ("send.log", "recv.log"))
        raise benchlab.BenchError(f"{path}@{size_mb}MB: {exc}\n{logs}") from None
    finally:
        for p in (tx, rx):
            if p.poll() is None:
                p.kill()
            p.wait()
    if got.get("error") or not got.get("complete") or got.get("received") != sent["bytes"]:
        raise benchlab.BenchError(f"{path}@{size_mb}MB: the receiver did not get the whole bundle: {got}")
    shutil.rmtree(dst, ignore_errors=True)
    mb = sent["bytes"] / 1e6
    return {"path": path, "size_mb": size_mb, "bytes": sent["bytes"], "seconds": sent["seconds"],
            "mb_s": mb / sent["seconds"], "cpu_s_per_100mb": {"sender": sent["cpu_s"] / (mb / 100),
                                                              "receiver": got["cpu_s"] / (mb / 100)}}


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    thr: dict[str, float] = {}
    cpu: dict[str, dict[str, float]] = {"sender": {}, "receiver": {}}
    for size in sizes:
        for path in PATHS:
            mine = [r for r in rows if r["path"] == path and r["size_mb"] == size]
            if not mine:
                continue
            key = f"{path}@{size}MB"
            thr[key] = round(statistics.median(r["mb_s"] for r in mine), 1)
            for side in ("sender", "receiver"):
                cpu[side][key] = round(statistics.median(r["cpu_s_per_100mb"][side] for r in mine), 3)
    ratios = {f"{s}MB": round(thr[f"lane@{s}MB"] / thr[f"tcp@{s}MB"], 3) for s in sizes
              if f"lane@{s}MB" in thr and f"tcp@{s}MB" in thr}
    big = {k: v for k, v in ratios.items() if int(k[:-2]) >= 100}
    return {"throughput_mb_s": thr, "cpu_s_per_100mb": cpu, "lane_vs_tcp": ratios,
            "lane_vs_libp2p": {f"{s}MB": round(thr[f"lane@{s}MB"] / thr[f"libp2p@{s}MB"], 2) for s in sizes
                               if f"lane@{s}MB" in thr and f"libp2p@{s}MB" in thr},
            "target": {"lane_at_least_0.7x_tcp_for_100MB_and_more": {
                "ratios": big, "met": all(v >= TARGET_RATIO for v in big.values()) if big else None}}}


def table(doc: dict[str, Any], sizes: list[int]) -> str:
    lines = [f"{'path':<8}{'size':>7}{'MB/s':>9}{'CPU s/100MB send':>18}{'recv':>8}{'vs tcp':>8}"]
    for size in sizes:
        for path in PATHS:
            key = f"{path}@{size}MB"
            if key not in doc["throughput_mb_s"]:
                continue
            ratio = doc["throughput_mb_s"][key] / doc["throughput_mb_s"][f"tcp@{size}MB"]
            lines.append(f"{path:<8}{size:>5}MB{doc['throughput_mb_s'][key]:>9.1f}"
                         f"{doc['cpu_s_per_100mb']['sender'][key]:>18.3f}"
                         f"{doc['cpu_s_per_100mb']['receiver'][key]:>8.3f}{ratio:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 and 100 MB only")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--sizes", default=None, help="comma-separated MB (default 10,100,500; quick 10,100)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per PATH@SIZE (the median is reported)")
    ap.add_argument("--store", type=Path, default=benchlab.ROOT / "out" / "bench" / "transfer",
                    help="source bundles (kept between runs) and receiver stores (deleted after each run)")
    ap.add_argument("--role", choices=("send", "recv"), help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role:
        import trio

        fn = role_sender if args.role == "send" else role_receiver
        trio.run(fn, args.path, args.src, args.dst, args.size)
        return 0
    sizes = [int(s) for s in (args.sizes or ("10,100" if args.quick else "10,100,500")).split(",")]
    reps = args.reps
    before = contention()
    src = args.store / "src"
    work = args.store / "runs"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            log(f"preparing a {size} MB bundle")
            make_bundle(src, size)
            for rep in range(reps):
                for path in PATHS:
                    r = run_one(path, size, src, work)
                    log(f"{path}@{size}MB rep {rep + 1}/{reps}: {r['mb_s']:.1f} MB/s, CPU s/100MB "
                        f"send {r['cpu_s_per_100mb']['sender']:.3f} recv {r['cpu_s_per_100mb']['receiver']:.3f}")
                    rows.append(r)
    except (benchlab.BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc: dict[str, Any] = {
        "benchmark": "transfer", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": benchlab.machine(), "quick": args.quick, "sizes": [f"{s}MB" for s in sizes], "reps": reps,
        "layers": {f"{s}MB": LAYERS.get(s, max(1, s // 32)) for s in sizes}, "store": str(args.store),
        "contention": {"before": before, "after": contention()},
        **summarize(rows, sizes), "runs": rows,
    }
    print(table(doc, sizes))
    if before["loadavg_1m"] > 1.0:
        print(f"warning: load average {before['loadavg_1m']} before the run: other work shared the cores, "
              "throughput may be low (CPU seconds per 100 MB are less affected)")
    t = doc["target"]["lane_at_least_0.7x_tcp_for_100MB_and_more"]
    verdict = {True: "met", False: "NOT met", None: "not measured (no size >= 100 MB)"}[t["met"]]
    print(f"lane/tcp: {doc['lane_vs_tcp']}  target lane >= {TARGET_RATIO}x tcp for >= 100 MB: {verdict}")
    if args.json:
        benchlab.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
