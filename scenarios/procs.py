"""Host processes of the local and netns backends: start, signal, wait for readiness, never orphan.

Every child runs in its own session (so a signal reaches the node and its training worker together, as a
crash of the whole host would) and carries PR_SET_PDEATHSIG=SIGKILL, so nodes die with the runner even when
the runner itself is SIGKILLed. Readiness is `node.json` naming the child's pid; nothing sleeps to wait.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PY = sys.executable
POLL_S = 0.05  # readiness polls: node.json appears within ~1-3 s of a start
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class WaitTimeout(Exception):
    pass


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `cond` until truthy; WaitTimeout names `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except WaitTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 - conditions may fail while processes start
            last = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {type(last).__name__}: {last})" if last else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(POLL_S)


class Proc:
    """One host's process (a node or the bootstrap peer), restartable with the same home."""

    def __init__(self, name: str, home: Path, argv: list[str], log_path: Path, env: dict[str, str],
                 cwd: Path) -> None:
        self.name = name
        self.home = home
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.starts = 0

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        try:
            (self.home / "node.json").unlink()
        except FileNotFoundError:
            pass
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} at {time.time():.3f}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.cwd, env=self.env, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        self.stopped = False
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def node_json(self) -> dict[str, Any] | None:
        try:
            info = json.loads((self.home / "node.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info if self.popen is not None and info.get("pid") == self.pid else None

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if not self.alive():
                code = None if self.popen is None else self.popen.returncode
                raise WaitTimeout(f"{self.name} exited with status {code} before it was ready:\n{self.tail()}")
            return self.node_json()

        return wait_for(ready, timeout, f"{self.name} to write node.json")

    def _signal_group(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole host (node and worker): a crash with no cleanup."""
        self._signal_group(signal.SIGCONT)
        self._signal_group(signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.stopped = False

    def stop(self) -> None:
        """SIGSTOP the whole host: frozen, connections open, nothing answers."""
        self._signal_group(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        self._signal_group(signal.SIGCONT)
        self.stopped = False

    def leave(self) -> None:
        """Graceful exit: SIGTERM to the node, which shuts down cleanly on its own (within 5 s, its
        contract); `reap()` or `kill()` collects it. Not waited for here: the runner keeps its timeline."""
        if not self.alive():
            return
        self._signal_group(signal.SIGCONT)
        os.kill(self.pid, signal.SIGTERM)
        self.stopped = False

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            lines = []
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(lines)
