"""The receiving end of a lane: the bundle handler's stream interface (LaneIO) and the layer receive loop.

The loop is the shared layer sink (snakenode/layers/sink.py) fed from one worker thread, so the lane
refuses exactly what the libp2p bundle stream refuses (including a too-slow sender) and no per-chunk work
crosses into the event loop; a second thread verifies and commits each finished layer while the next one
streams in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import trio

from snakenode import wire
from snakenode.counters import Counters
from snakenode.faults import Faults
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.sink import READ_CHUNK, FinishedLayer, LayerSink
from snakenode.layers.store import LayerStore
from snakenode.net import transfer
from snakenode.net.host import StreamIO
from snakenode.net.lane.conn import Conn, Progress, in_thread

FILL_S = 1.0  # a receive returns what arrived within this long, so a trickle still reaches the rate guard
_T = TypeVar("_T")


class _Verifier:
    """Commits a finished layer in a second thread while the next one streams in.

    Why: fsync, the second sha256 and the finite-value check cost about as much as receiving; done in line
    they stall the socket. Depth one: a layer is handed over only after the previous one has passed, so at
    most one layer is in verification and a failure stops the transfer one layer later at the latest."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, layer: FinishedLayer) -> None:
        try:
            layer.commit()
        except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the layer in verification is committed; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, layer: FinishedLayer) -> None:
        """Start committing `layer`; call wait() first (the previous layer must have passed)."""
        if self._thread is not None:
            raise RuntimeError("wait() for the layer in verification first")
        self._thread = threading.Thread(target=self._run, args=(layer,), name="lane-verify", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """On the way out after an error: let the layer in verification finish (it was complete)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _recv_layers_blocking(conn: Conn, incoming: transfer.Incoming, schema: Mapping[str, bundle_mod.LayerEntry],
                          store: LayerStore, faults: Faults | None, ctx: Mapping[str, Any],
                          progress: Callable[[int], None] | None) -> int:
    """transfer.receive_layers in one worker thread (plus the verifier): the same layer sink, so the same
    checks, errors, partial files, resume offsets and minimum rate; it returns only when every received
    layer is verified and in the store."""
    buf = bytearray(READ_CHUNK)
    mv = memoryview(buf)
    sink = LayerSink(incoming.send, schema, store, faults=faults, ctx=ctx, on_progress=progress)
    verifier = _Verifier()
    try:
        while sink.next_layer() is not None:
            while n := sink.want():
                try:
                    k = conn.recv_some_into(mv[:n], wire.READ_TIMEOUT_S, FILL_S)
                except TimeoutError:
                    raise transfer.TransferError(f"no lane data for {wire.READ_TIMEOUT_S:g} s", "timeout") from None
                except wire.WireError as exc:
                    raise transfer.TransferError(str(exc), exc.kind) from None
                except OSError as exc:
                    raise transfer.TransferError(f"lane broke: {exc}", "broken") from None
                sink.feed(mv[:k])
            verifier.wait()  # if the previous layer failed, the sink settles this one (complete) on the way out
            verifier.submit(sink.complete())
        verifier.wait()
    finally:
        verifier.drain()
        sink.close()
    return sink.received


class LaneIO:
    """StreamIO's interface over an authenticated lane connection, so the bundle handler that serves
    `/snake/bundle/1.0.0` serves the lane unchanged. `peer` is the peer id the offer was made to (the peer
    the Noise-authenticated negotiation ran with), not anything the connection claims."""

    def __init__(self, conn: Conn, counters: Counters, peer: str, name: str = "lane") -> None:
        self.conn = conn
        self.counters = counters
        self.peer = peer
        self.name = name

    @property
    def bytes_in(self) -> int:
        return self.conn.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.conn.bytes_out

    async def _io(self, fn: Callable[[], _T]) -> _T:
        before_in, before_out = self.conn.bytes_in, self.conn.bytes_out
        try:
            return await in_thread(fn, self.conn)
        except TimeoutError:
            raise trio.TooSlowError from None
        except OSError as exc:
            raise wire.WireError(f"lane broke: {exc}", "truncated") from None
        finally:
            self.counters.add(f"bytes.{self.name}.in", self.conn.bytes_in - before_in)
            self.counters.add(f"bytes.{self.name}.out", self.conn.bytes_out - before_out)

    async def read_exact(self, n: int, timeout: float = wire.READ_TIMEOUT_S) -> bytes:
        return await self._io(lambda: self.conn.read_exact(n, timeout))

    async def read_some(self, max_n: int, timeout: float = wire.READ_TIMEOUT_S) -> bytes:
        def recv() -> bytes:
            self.conn.sock.settimeout(timeout)
            data = self.conn.sock.recv(max_n)
            if not data:
                raise wire.WireError("lane closed by the peer", "truncated")
            self.conn.bytes_in += len(data)
            return data

        return await self._io(recv)

    async def read_frame(self, limit: int = wire.MAX_FRAME, timeout: float = wire.READ_TIMEOUT_S
                         ) -> tuple[str, wire.Fields]:
        return await self._io(lambda: self.conn.read_frame(limit, timeout))

    async def write(self, data: bytes) -> None:
        await self._io(lambda: self.conn.send(data))

    async def write_frame(self, obj: dict[str, Any]) -> None:
        await self.write(wire.frame(obj))

    async def receive_layers(self, incoming: transfer.Incoming, schema: Mapping[str, bundle_mod.LayerEntry],
                             store: LayerStore, *, faults: Faults | None = None,
                             ctx: Mapping[str, Any] | None = None,
                             on_progress: Callable[[int], None] | None = None) -> int:
        progress = Progress(on_progress)
        before = self.conn.bytes_in
        try:
            n = await in_thread(lambda: _recv_layers_blocking(self.conn, incoming, schema, store, faults,
                                                               dict(ctx or {}), progress), self.conn)
        finally:
            self.counters.add(f"bytes.{self.name}.in", self.conn.bytes_in - before)
        progress.done(n)
        return n

    async def close(self) -> None:
        self.conn.close()

    async def reset(self) -> None:
        self.conn.shutdown()
        await self.close()


async def receive_layers(io: StreamIO | LaneIO, incoming: transfer.Incoming,
                         schema: Mapping[str, bundle_mod.LayerEntry], store: LayerStore, *,
                         faults: Faults | None = None, ctx: Mapping[str, Any] | None = None,
                         on_progress: Callable[[int], None] | None = None) -> int:
    """transfer.receive_layers for either kind of stream: the lane's runs its whole loop in one thread."""
    if isinstance(io, LaneIO):
        return await io.receive_layers(incoming, schema, store, faults=faults, ctx=ctx, on_progress=on_progress)
    return await transfer.receive_layers(io, incoming, schema, store, faults=faults, ctx=ctx,
                                         on_progress=on_progress)
