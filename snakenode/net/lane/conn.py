"""A lane connection's blocking I/O, driven from trio worker threads.

Why threads and blocking sockets: Python's `ssl` keeps every per-record step (AES-GCM, framing) in
OpenSSL, so a blocking socket in a worker thread moves bundle bytes at close to plain-TCP speed, where the
event loop would pay per chunk. Every call has a timeout, and a cancelled call shuts the socket down so its
thread ends promptly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from snakenode import wire

SEND_TIMEOUT_S = 60.0  # a write may wait while the receiver verifies and fsyncs a large layer
_T = TypeVar("_T")


class LaneError(Exception):
    """The lane could not be used; `kind` names the reason (counter suffix, log field)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class LaneUnavailable(LaneError):
    """Raised before any bundle byte moved: the caller may fall back to the libp2p stream."""


class Conn:
    """A blocking socket (TLS, or plain for the benchmark's baseline) with exact reads and frames.
    Used only from worker threads; every call has a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_in = 0
        self.bytes_out = 0

    def recv_into(self, mv: memoryview, timeout: float) -> None:
        """Fill `mv` completely or raise (EOF -> WireError truncated, silence -> TimeoutError)."""
        self.sock.settimeout(timeout)
        got, n = 0, len(mv)
        while got < n:
            k = self.sock.recv_into(mv[got:], n - got)
            if not k:
                raise wire.WireError("lane closed by the peer", "truncated")
            got += k
        self.bytes_in += n

    def recv_some_into(self, mv: memoryview, timeout: float, fill_s: float) -> int:
        """Read at least one byte into `mv` (silence -> TimeoutError, EOF -> WireError truncated) and keep
        filling it while bytes keep coming for up to `fill_s`: a fast sender's bytes arrive in whole chunks
        (TLS records are 16 KiB), a slow one's still reach the caller's rate check every `fill_s`."""
        self.sock.settimeout(timeout)
        got, n = 0, len(mv)
        start = time.monotonic()
        while got < n:
            k = self.sock.recv_into(mv[got:], n - got)
            if not k:
                if got:
                    break  # the next call reports the end
                raise wire.WireError("lane closed by the peer", "truncated")
            got += k
            self.bytes_in += k
            if time.monotonic() - start >= fill_s:
                break
        return got

    def read_exact(self, n: int, timeout: float) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf), timeout)
        return bytes(buf)

    def read_frame(self, limit: int, timeout: float) -> tuple[str, wire.Fields]:
        (length,) = wire.HEADER.unpack(self.read_exact(4, timeout))
        if length > limit:
            raise wire.WireError(f"frame of {length} bytes exceeds the {limit}-byte limit", "oversize")
        return wire.decode_message(self.read_exact(length, timeout), limit)

    def send(self, data: bytes | memoryview, timeout: float = SEND_TIMEOUT_S) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)
        self.bytes_out += len(data)

    def shutdown(self) -> None:
        """Wake any thread blocked on this socket (close() alone does not on Linux)."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the raw fd, bypassing SSLSocket state
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


async def in_thread(fn: Callable[[], _T], conn: Conn | None) -> _T:
    """Run blocking `fn` in a worker thread; if we are cancelled, shut the socket so it returns soon."""
    finished = threading.Event()

    def run() -> _T:
        try:
            return fn()
        finally:
            finished.set()

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException:
        if not finished.is_set():
            if conn is not None:
                conn.shutdown()
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                while not finished.is_set():
                    await trio.sleep(0.01)
        raise


class Progress:
    """Report progress from a worker thread to the trio side at most every `every_s` seconds."""

    def __init__(self, fn: Callable[[int], None] | None, every_s: float = 0.25) -> None:
        self.fn = fn
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, n: int) -> None:
        now = time.monotonic()
        if self.fn is not None and now - self.last >= self.every_s:
            self.last = now
            trio.from_thread.run_sync(self.fn, n)

    def done(self, n: int) -> None:
        if self.fn is not None:
            self.fn(n)
