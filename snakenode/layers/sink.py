"""Receiving a model's layers: the one path every transport feeds (the libp2p bundle stream and the lane).

Why one path: what makes received bytes safe to keep (the layer belongs to the job's model and has its
size, the sender resumes exactly where our partial file stops, a finished layer is verified before it
enters the store, a sender too slow to be honest is cut off) must not depend on how the bytes arrived.
The sink does no I/O of its own beyond the store's files: a transport asks `want()`, reads at most that
many bytes and hands them to `feed()`; when a layer is complete it commits it (`complete()` then
`FinishedLayer.commit()`, a blocking call the transport runs off its event loop, in line or overlapped with
the next layer).

Layers listed with `pack` (bf16-packed from byte 0, docs/PROTOCOL.md `/snake/bundle/1.0.0`) arrive as
their safetensors header, then the high halves of the data section's 32-bit words; the sink restores the
zero low halves before the bytes reach the partial file, so the store only ever sees the layer's real bytes.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from snakenode import logs
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore, PartialBlob, StoreError

log = logs.get("layers")

READ_CHUNK = 1 << 20  # the most a transport reads per feed: large enough that per-call costs vanish
# A sender slower than this on average (after a grace period) is cut off: a trickle of bytes would
# otherwise hold a reservation and a connection forever (slowloris). 16 KiB/s is far below any real link.
MIN_RATE_B_S = 16 * 1024
MIN_RATE_GRACE_S = 15.0


class TransferError(Exception):
    """A bundle that cannot be accepted; `kind` is the counter and the error reported to the sender."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Listed(Protocol):
    """A layer as the sender's `bundle` frame lists it (net/transfer.py's SendItem)."""

    entry: bundle_mod.LayerEntry
    offset: int
    pack: int | None


class FaultCheck(Protocol):
    """The `--test-faults` hook (snakenode/faults.py): "break" ends the transfer on purpose."""

    def check(self, phase: str, **ctx: Any) -> str | None: ...


def verify_file(path: str, entry: bundle_mod.LayerEntry, schema: bundle_mod.LayerEntry) -> None:
    """Size, header, names/dtypes/shapes against the model's schema, sha256, finite values.

    The map is deliberately not closed in a `with`: when verification fails, the exception's traceback
    still holds views of it, and closing would replace the BundleError with a BufferError (the refusal
    became error.handler.bundle, without an error frame, and the bad partial file stayed). It is unmapped
    when the last view goes."""
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            raise bundle_mod.Truncated(entry.name, "empty blob")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    bundle_mod.verify_blob(memoryview(mm), entry, schema=schema)


@dataclass
class FinishedLayer:
    """A layer whose bytes are all in its partial file: `commit()` makes it a blob or refuses it."""

    store: LayerStore
    part: PartialBlob
    entry: bundle_mod.LayerEntry
    schema: bundle_mod.LayerEntry

    def commit(self) -> None:
        """Blocking (fsync, mmap, sha256, finite check): run it in a worker thread. A layer that fails
        verification is deleted, so the next attempt sends it again from byte 0."""
        self.part.close()
        try:
            verify_file(str(self.part.path), self.entry, self.schema)
        except bundle_mod.BundleError as exc:
            self.store.discard_partial(self.entry.hash)
            raise TransferError(str(exc), exc.code) from None
        try:
            self.store.commit_partial(self.part)
        except StoreError as exc:
            raise TransferError(str(exc), "hash_mismatch") from None


class _Layer:
    """The layer being received: its partial file and where its byte stream stands."""

    def __init__(self, item: Listed, schema: bundle_mod.LayerEntry, part: PartialBlob) -> None:
        self.entry = item.entry
        self.schema = schema
        self.part = part
        self.remaining = item.entry.size - item.offset  # layer bytes (restored) still to come
        self.packed = item.pack is not None
        self.head = bytearray()  # a packed layer's header, until it is whole
        self.head_len: int | None = None if self.packed else 0
        self.carry = b""  # a packed layer's odd wire byte (half of a 16-bit half-word)

    @property
    def in_header(self) -> bool:
        """A packed layer's header travels as is (8-byte length, then the JSON): collect it whole first."""
        return self.packed and (self.head_len is None or len(self.head) < 8 + self.head_len)

    def want(self) -> int:
        if self.in_header:
            return (8 if self.head_len is None else 8 + self.head_len) - len(self.head)
        if self.packed:  # whole 16-bit halves: `remaining` stays a multiple of 4
            return min(READ_CHUNK, self.remaining) // 2 - len(self.carry)
        return min(READ_CHUNK, self.remaining)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.in_header:
            self.head += data
            if self.head_len is None and len(self.head) == 8:
                hlen = int.from_bytes(self.head, "little")
                size = self.entry.size
                if hlen > min(size - 8, bundle_mod.MAX_HEADER_BYTES) or (size - 8 - hlen) % 4:
                    raise TransferError(f"layer {self.entry.name!r}: a bf16-packed blob needs a header within the "
                                        "layer and a data section of whole 32-bit words", "malformed")
                self.head_len = hlen
            if not self.in_header:
                self._write(self.head)
        elif self.packed:
            wire_bytes = self.carry + bytes(data)
            even = len(wire_bytes) & ~1
            self.carry = wire_bytes[even:]
            self._write(bundle_mod.unpack_bf16(wire_bytes[:even]))
        else:
            self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.part.write(data)
        except StoreError as exc:
            raise TransferError(str(exc), "oversize") from None
        self.remaining -= len(data)


class LayerSink:
    """The listed layers' bytes, in order, from any transport, into `store`; see the module docstring.

    Use: `while (layer := sink.next_layer()) is not None:` read and `feed()` while `want()` is not 0, then
    `sink.complete().commit()`; `close()` in a `finally` (blocking). Every refusal is a TransferError whose
    kind is the counter suffix and the error frame's kind. `clock` is injectable for the rate guard's tests.
    """

    def __init__(self, items: Sequence[Listed], schema: Mapping[str, bundle_mod.LayerEntry], store: LayerStore, *,
                 faults: FaultCheck | None = None, ctx: Mapping[str, Any] | None = None,
                 on_progress: Callable[[int], None] | None = None, min_rate: float = MIN_RATE_B_S,
                 grace_s: float = MIN_RATE_GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.schema = schema
        self.faults = faults
        self.ctx = dict(ctx or {})
        self.on_progress = on_progress
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.clock = clock
        self.received = 0  # bytes as they travelled (a packed layer's halves count once)
        self._items = list(items)
        self._next = 0
        self._current: _Layer | None = None
        self._t0 = clock()

    def next_layer(self) -> bundle_mod.LayerEntry | None:
        """Start the next listed layer (checked against the job's model and our partial file), or None when
        every layer was received."""
        if self._current is not None:
            raise RuntimeError("the current layer is not complete: feed it, then call complete()")
        if self._next >= len(self._items):
            return None
        it = self._items[self._next]
        self._next += 1
        entry = it.entry
        sch = self.schema.get(entry.name)
        if sch is None:
            raise TransferError(f"layer {entry.name!r} is not part of this job's model", "unknown_layer")
        if entry.size != sch.size:
            raise TransferError(f"layer {entry.name!r} announces {entry.size} bytes, the model's layer has "
                                f"{sch.size}", "oversize" if entry.size > sch.size else "truncated")
        if self.store.has(entry.hash):
            raise TransferError(f"layer {entry.name!r} was sent although we hold it", "unexpected")
        try:
            part = self.store.open_partial(entry.hash, size=entry.size)
        except StoreError as exc:
            raise TransferError(str(exc), "store") from None
        self._current = _Layer(it, sch, part)
        if part.offset != it.offset:
            raise TransferError(f"layer {entry.name!r}: sender resumes at byte {it.offset}, we hold {part.offset}",
                                "offset_mismatch")
        return entry

    def want(self) -> int:
        """Bytes the transport may read for the current layer now; 0 once the layer is complete."""
        if self._current is None or self._current.remaining <= 0:
            return 0
        return self._current.want()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read for the current layer (at most `want()` of them). Enforces the minimum rate and fires
        the `recv` test fault."""
        n = len(data)
        if self._current is None or not 0 < n <= self.want():
            raise RuntimeError(f"fed {n} bytes where the sink wants {self.want()}")
        self._current.feed(data)
        self.received += n
        elapsed = self.clock() - self._t0
        if elapsed > self.grace_s and self.received / elapsed < self.min_rate:
            raise TransferError(f"sender too slow: {self.received} bytes in {elapsed:.0f} s (minimum "
                                f"{self.min_rate / 1024:g} KiB/s)", "too_slow")
        if self.on_progress is not None:
            self.on_progress(self.received)
        if self.faults is not None and self.faults.check("recv", bytes=self.received, **self.ctx) == "break":
            raise TransferError(f"transfer broken on purpose after {self.received} bytes (--test-faults)",
                                "test_fault")

    def complete(self) -> FinishedLayer:
        """Hand over the complete current layer; the caller must `commit()` it."""
        cur = self._current
        if cur is None or cur.remaining > 0:
            raise RuntimeError("no complete layer to hand over")
        self._current = None
        return FinishedLayer(self.store, cur.part, cur.entry, cur.schema)

    def close(self) -> None:
        """Blocking. A layer we stop at keeps its bytes for a resume, but is never left complete and
        uncommitted: the sender plans a complete partial from byte 0, while the store would resume it at its
        size, and every later attempt would end in offset_mismatch. So a complete one is verified and
        committed here (a bad one is deleted and will be sent again)."""
        cur, self._current = self._current, None
        if cur is None:
            return
        if cur.remaining > 0:
            cur.part.close()
            return
        try:
            FinishedLayer(self.store, cur.part, cur.entry, cur.schema).commit()
        except TransferError as exc:
            log.warning("layer_rejected", layer=cur.entry.name, kind=exc.kind, error=str(exc)[:200])
