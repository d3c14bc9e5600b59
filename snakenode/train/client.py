"""Trio-side client of the training worker (torch-free; the daemon imports it).

Why a process and not a thread: on 2 cores a training step starves a thread-based event loop, and a
process can be niced, bounded in threads and killed to cancel work. The worker dies with its parent (a
re-parenting watchdog, and EOF on its stdin); `cancel()` kills it and the next `call()` starts a new one.
A worker crash surfaces as WorkerError on the pending call, never as a hang.
"""

from __future__ import annotations

import inspect
import os
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

MAX_REPLY_BYTES = 256 * 1024 * 1024
EventCallback = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class WorkerError(Exception):
    """A failed worker call. `kind`: the worker's error kind (bad_job, bad_data, bad_model, bad_state,
    missing_blob, diverged, out_of_memory, internal, ...) or `worker_died` / `cancelled` / `protocol`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


class WorkerClient:
    """One worker process, started lazily; one call at a time (calls queue on a lock)."""

    def __init__(self, home: str | os.PathLike[str], threads: int | None = None, nice: int = 10, *,
                 python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.threads = max(1, threads or default_threads())
        self.nice = nice
        self.python = python or sys.executable
        self.extra_env = dict(env or {})
        self._proc: trio.Process | None = None
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._next_id = 0
        self._cancelled = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def busy(self) -> bool:
        """A call is in progress (cancel() would interrupt it)."""
        return self._lock.locked()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _start(self) -> trio.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        await self._reap()
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        cmd = [self.python, "-m", "snakenode.train.worker", "--home", str(self.home), "--threads",
               str(self.threads), "--nice", str(self.nice), "--parent-pid", str(os.getpid())]
        self.home.mkdir(parents=True, exist_ok=True)
        self._proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                      stderr=None, env=env)
        self._buf = bytearray()
        self._cancelled = False
        return self._proc

    async def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            await proc.wait()
            for s in (proc.stdin, proc.stdout):
                if s is not None:
                    await s.aclose()

    async def _read_frame(self, proc: trio.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack(">I", self._buf[:4])
                if n > MAX_REPLY_BYTES:
                    raise WorkerError("protocol", f"worker frame of {n} bytes exceeds {MAX_REPLY_BYTES}")
                if len(self._buf) >= 4 + n:
                    body = bytes(self._buf[4:4 + n])
                    del self._buf[:4 + n]
                    msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
                    if not isinstance(msg, dict):
                        raise WorkerError("protocol", "worker frame is not a map")
                    return msg
            chunk = await proc.stdout.receive_some(1 << 16)
            if not chunk:
                rc = await proc.wait()
                if self._cancelled:
                    raise WorkerError("cancelled", "the call was cancelled; the worker was stopped and starts "
                                                   "again on the next call")
                raise WorkerError("worker_died", f"the training worker exited (code {rc}) during the call; see "
                                                 "its stderr in the daemon log; it restarts on the next call")
            self._buf += chunk

    async def call(self, op: str, args: dict[str, Any] | None = None,
                   on_event: EventCallback | None = None) -> dict[str, Any]:
        """Run one op in the worker. Raises WorkerError on an error reply, a crash or cancel()."""
        async with self._lock:
            proc = await self._start()
            self._next_id += 1
            rid = self._next_id
            body = msgpack.packb({"id": rid, "op": op, "args": args or {}}, use_bin_type=True)
            try:
                assert proc.stdin is not None
                try:
                    await proc.stdin.send_all(struct.pack(">I", len(body)) + body)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass                               # the reader below reports how the worker died
                while True:
                    msg = await self._read_frame(proc)
                    if msg.get("id") != rid:
                        continue                       # a stale frame (cannot happen after a restart)
                    if "event" in msg:
                        if on_event is not None:
                            r = on_event(str(msg["event"]), msg.get("data") or {})
                            if inspect.isawaitable(r):
                                await r
                        continue
                    if msg.get("ok") is True:
                        result = msg.get("result")
                        return result if isinstance(result, dict) else {"value": result}
                    raise WorkerError(str(msg.get("kind", "internal")), str(msg.get("error", "")))
            except WorkerError as e:
                if e.kind in ("worker_died", "cancelled", "protocol"):
                    await self._reap()
                raise
            except BaseException:
                # Our caller was cancelled (or failed) mid-call: the worker is still busy with a request nobody
                # will read, so stop it; the next call starts a fresh one.
                await self._reap()
                raise

    async def cancel(self) -> None:
        """Kill the worker now (a pending call fails with kind `cancelled`); the next call restarts it."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._cancelled = True
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        if not self._lock.locked():
            await self._reap()

    async def aclose(self, timeout: float = 3.0) -> None:
        """Close stdin (the worker exits at EOF) and wait; kill it if it does not go in time."""
        proc = self._proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.stdin is not None:
                try:
                    await proc.stdin.aclose()
                except trio.ClosedResourceError:
                    pass
            with trio.move_on_after(timeout):
                await proc.wait()
            await self._reap()
