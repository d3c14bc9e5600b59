"""The node's home directory: node.json, the single-daemon lock, and where things live.

`node.json` is written atomically once the node listens and removed on clean exit. After a kill -9 it
stays behind; the lock file tells a live daemon from a stale file (an flock dies with its process, a pid
can be reused), so neither `start` nor the CLI is fooled by a stale node.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

NODE_JSON = "node.json"
LOCK_FILE = "node.lock"
SOCKET_NAME = "control.sock"
# AF_UNIX paths are limited to 108 bytes on Linux (including the NUL).
UNIX_PATH_MAX = 107


class HomeError(Exception):
    pass


class NoDaemon(HomeError):
    def __init__(self, home: Path) -> None:
        super().__init__(f"no node running in {home} (start one with snakenode start --home {home})")


def write_json_atomic(path: Path, obj: Any, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class HomeLock:
    """Exclusive lock held by the running daemon for its whole life."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_node_json(self.path.parent)
            pid = info.get("pid", "?") if info else "?"
            raise HomeError(
                f"a node is already running in {self.path.parent} (pid {pid}); stop it first "
                f"or use another --home"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def daemon_running(home: Path) -> bool:
    """True if some process holds HOME's lock (works across pid reuse and kill -9)."""
    path = Path(home) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_node_json(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(home) / NODE_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def live_node_json(home: Path) -> dict[str, Any]:
    """node.json of a running daemon, or NoDaemon (stale files from a killed node do not count)."""
    home = Path(home)
    info = read_node_json(home)
    if info is None or not daemon_running(home):
        raise NoDaemon(home)
    return info


def control_socket_path(home: Path) -> tuple[Path, Path | None]:
    """HOME/control.sock, or a socket in a private 0700 directory when HOME's path is too long."""
    path = Path(home) / SOCKET_NAME
    if len(str(path).encode()) <= UNIX_PATH_MAX - 1:
        return path, None
    private = Path(tempfile.mkdtemp(prefix="snakenode-"))
    os.chmod(private, 0o700)
    return private / SOCKET_NAME, private
