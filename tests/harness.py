"""Real processes on 127.0.0.1 for integration tests: bootstrap peers and nodes, with bounded waits.

Every wait polls a condition (node.json appearing, a peer table reaching a state, a log line) with a
deadline; nothing sleeps to synchronise. Each process logs to DIR/<name>.log; on a failed wait the tail of
every log is attached to the assertion message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
POLL_S = 0.05


class WaitTimeout(AssertionError):
    pass


def wait_for(cond: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] | None = None) -> Any:
    """Poll `cond` until it returns a truthy value; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - conditions may fail while processes start
            last_exc = exc
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g} s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {type(last_exc).__name__}: {last_exc})"
            if logs is not None:
                msg += "\n" + logs()
            raise WaitTimeout(msg)
        time.sleep(POLL_S)


def snakenode_cmd() -> list[str]:
    return [PY, "-m", "snakenode.cli"]


def run_cli(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*snakenode_cmd(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


class Proc:
    def __init__(self, name: str, home: Path, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.home = home
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        try:
            (self.home / "node.json").unlink()
        except FileNotFoundError:
            pass
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                      env=self.env, start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def node_json(self) -> dict[str, Any] | None:
        try:
            info = json.loads((self.home / "node.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info if info.get("pid") == self.pid else None

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.popen is not None and self.popen.poll() is not None:
                raise WaitTimeout(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            return self.node_json()

        return wait_for(ready, timeout, f"{self.name} to write node.json", self.tail)

    @property
    def peer_id(self) -> str:
        info = self.node_json() or json.loads((self.home / "node.json").read_text())
        return info["peer_id"]

    @property
    def addr(self) -> str:
        info = self.node_json()
        assert info is not None, f"{self.name} is not running"
        return info["addrs"][0]

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 8) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.popen is not None
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
            raise

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            lines = []
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(lines)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Net:
    """A set of processes under one directory; `close()` kills whatever is left."""

    def __init__(self, root: Path, network: str = "test", base_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.network = network
        self.procs: dict[str, Proc] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(base_env or {})}
        self.env.pop("SNAKENODE_HOME", None)

    def home(self, name: str) -> Path:
        return self.root / name

    def start_bootstrap(self, name: str = "boot", listen: str = "/ip4/127.0.0.1/tcp/0",
                        extra: list[str] | None = None) -> Proc:
        argv = [PY, "-m", "bootstrap", "--home", str(self.home(name)), "--listen", listen,
                "--network", self.network, *(extra or [])]
        proc = Proc(name, self.home(name), argv, self.root / f"{name}.log", self.env)
        self.procs[name] = proc
        return proc

    def start_node(self, name: str, bootstrap: list[str] | None = None, data: str | None = "digits",
                   extra: list[str] | None = None, listen: str = "/ip4/127.0.0.1/tcp/0",
                   env: dict[str, str] | None = None) -> Proc:
        argv = [*snakenode_cmd(), "start", "--home", str(self.home(name)), "--listen", listen,
                "--network", self.network]
        for b in bootstrap or []:
            argv += ["--bootstrap", b]
        if data:
            argv += ["--data", data]
        argv += extra or []
        proc = Proc(name, self.home(name), argv, self.root / f"{name}.log", {**self.env, **(env or {})})
        self.procs[name] = proc
        return proc

    def start_argv(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, self.home(name), argv, self.root / f"{name}.log", self.env)
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_for(cond, timeout, what, self.logs)

    def close(self) -> None:
        for p in self.procs.values():
            if p.alive():
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                assert p.popen is not None
                try:
                    p.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass


def control(home: Path, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    sys.path.insert(0, str(REPO))
    from snakenode import control as control_mod

    return control_mod.call(home, op, args, timeout=timeout)


def peer_ids(home: Path, role: str | None = None) -> set[str]:
    rows = control(home, "peers", timeout=2.0)
    return {r["peer_id"] for r in rows if role is None or r["role"] == role}
