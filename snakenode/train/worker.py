"""The training worker process: msgpack RPC over stdin/stdout (`python -m snakenode.train.worker`).

Frames are a 4-byte big-endian length and a msgpack map (see docs/ARCHITECTURE.md, "Worker RPC").
The worker dies with its daemon: a watchdog thread exits when the worker is re-parented (see
`die_with_parent` for why not PR_SET_PDEATHSIG), and a reader thread exits the process as soon as stdin
reaches EOF, even in the middle of a training step. Everything
torch prints goes to stderr: fd 1 is moved aside for frames before torch is imported.
"""

from __future__ import annotations

import argparse
import os
import queue
import struct
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

import msgpack

MAX_REQUEST_BYTES = 64 * 1024 * 1024
PARENT_POLL_S = 0.2  # a killed daemon takes its worker with it within this


def die_with_parent(parent_pid: int | None) -> None:
    """End this worker when the daemon dies, however it dies.

    Not PR_SET_PDEATHSIG: it fires when the parent *thread* that spawned us exits, and trio spawns
    subprocesses from its thread cache, whose idle threads exit after ~10 s, which killed healthy workers
    mid-job. Instead a watchdog thread notices re-parenting (the daemon is gone); the stdin reader also
    exits on EOF (the daemon closed the pipe).
    """
    if parent_pid is None:
        return
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before we got here

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _reader(inp: BinaryIO, q: queue.Queue[dict[str, Any]]) -> None:
    """Frames from stdin into the queue; EOF (the daemon is gone or closed us) ends the process."""
    while True:
        head = _read_exact(inp, 4)
        if head is None:
            os._exit(0)
        (n,) = struct.unpack(">I", head)
        if n > MAX_REQUEST_BYTES:
            sys.stderr.write(f"worker: request of {n} bytes exceeds {MAX_REQUEST_BYTES}; exiting\n")
            os._exit(2)
        body = _read_exact(inp, n)
        if body is None:
            os._exit(0)
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as e:  # noqa: BLE001 - a bad frame is reported, not fatal
            msg = {"id": -1, "op": "__bad_frame__", "args": {"error": str(e)}}
        q.put(msg)


class Writer:
    def __init__(self, fd: int) -> None:
        self.f = os.fdopen(fd, "wb", buffering=0)
        self.lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        body = msgpack.packb(msg, use_bin_type=True, default=_plain)
        with self.lock:
            self.f.write(struct.pack(">I", len(body)) + body)


def _plain(obj: Any) -> Any:
    """numpy / torch scalars that slipped into a result become Python numbers."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__}")


class WorkerService:
    """Dispatches ops to the engine. Built after torch is imported and the thread count is set."""

    def __init__(self, home: str) -> None:
        from snakenode.train import engine

        self.home = home
        self.engine = engine.Engine(engine.default_store(home))

    def handle(self, op: str, args: dict[str, Any], event: Any) -> dict[str, Any]:
        import torch

        from snakenode.train import capacity

        e = self.engine
        if op == "ping":
            return {"pid": os.getpid(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        if op == "model_init":
            return e.model_init(_arg(args, "job", dict))
        if op == "train_hop":
            return e.train_hop(_arg(args, "job", dict), _arg(args, "state", dict), _arg(args, "window", list),
                               bool(args.get("train_stem", True)), bool(args.get("train_head", True)),
                               _arg(args, "data", dict), args.get("reference_hist"), args.get("max_time_s"),
                               event, bool(args.get("evaluate", True)), float(args.get("slowdown") or 1.0))
        if op == "evaluate":
            return e.evaluate(_arg(args, "job", dict), _arg(args, "state", dict), _arg(args, "data", dict),
                              str(args.get("split", "val")))
        if op == "capacity":
            return capacity.cached_measure(e, self.home, _arg(args, "job", dict), _arg(args, "data", dict))
        if op == "benchmark":
            return capacity.reference_benchmark(float(args.get("seconds", 1.0)))
        if op == "__bad_frame__":
            raise RequestError(f"undecodable request frame: {args.get('error')}")
        raise RequestError(f"unknown op {op!r}; ops: ping, model_init, train_hop, evaluate, capacity, benchmark")

    @staticmethod
    def classify(exc: BaseException) -> tuple[str, str]:
        from snakenode.train import data
        from snakenode.train.hopconfig import EngineError
        from snakenode.train.layered import ModelError

        if isinstance(exc, RequestError):
            return "bad_request", str(exc)
        if isinstance(exc, EngineError):
            return exc.kind, str(exc)
        if isinstance(exc, data.DataError):
            return "bad_data", str(exc)
        if isinstance(exc, ModelError):
            return "bad_model", str(exc)
        if isinstance(exc, MemoryError):
            return "out_of_memory", "the worker ran out of memory; use a smaller window, batch or micro_batch"
        if isinstance(exc, ValueError | TypeError | KeyError):
            return "bad_request", f"{type(exc).__name__}: {exc}"
        return "internal", f"{type(exc).__name__}: {exc} (traceback in the worker's stderr)"


class RequestError(Exception):
    pass


def _arg(args: dict[str, Any], key: str, typ: type) -> Any:
    v = args.get(key)
    if not isinstance(v, typ):
        raise RequestError(f"argument {key!r} must be a {typ.__name__}, got {type(v).__name__}")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snakenode.train.worker")
    ap.add_argument("--home", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--parent-pid", type=int, default=None)
    a = ap.parse_args(argv)
    die_with_parent(a.parent_pid)
    if a.nice > 0:
        try:
            os.nice(a.nice)
        except OSError:
            pass
    out_fd = os.dup(1)
    os.dup2(2, 1)                                   # stray prints (C or Python) go to stderr, not into frames
    sys.stdout = sys.stderr
    threads = max(1, a.threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")                # nothing may download at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    q: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_reader, args=(sys.stdin.buffer, q), daemon=True, name="stdin").start()
    writer = Writer(out_fd)

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from snakenode.train.memory import tune_malloc

    tune_malloc()
    svc = WorkerService(a.home)
    while True:
        msg = q.get()
        rid = msg.get("id") if isinstance(msg, dict) else None
        op = msg.get("op") if isinstance(msg, dict) else None
        args = msg.get("args") if isinstance(msg, dict) else None
        if not isinstance(rid, int) or not isinstance(op, str) or not isinstance(args, dict | None):
            writer.send({"id": rid if isinstance(rid, int) else -1, "ok": False, "kind": "bad_request",
                         "error": "a request needs id (int), op (str) and args (map)"})
            continue

        def event(name: str, data: dict[str, Any], _rid: int = rid) -> None:
            writer.send({"id": _rid, "event": name, "data": data})

        try:
            result = svc.handle(op, args or {}, event)
            writer.send({"id": rid, "ok": True, "result": result})
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            kind, text = svc.classify(e)
            if kind == "internal":
                traceback.print_exc(file=sys.stderr)
            writer.send({"id": rid, "ok": False, "kind": kind, "error": text})
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
