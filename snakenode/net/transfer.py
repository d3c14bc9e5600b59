"""Bundle streams on `/snake/bundle/1.0.0`: a manifest, then raw layer bytes, then an ack.

Sender: one `bundle` frame (the manifest: job, job_state, every layer of the model with its hash, and the
list of layers it is about to send with the byte offset each one resumes from), then the bytes of those
layers back to back in 1 MiB writes, then it waits for `ack`.

Receiver: feeds the layer bytes to the shared layer sink (snakenode/layers/sink.py, the lane's too), which
appends them to partial files in the layer store (hashed as they arrive), so a broken stream resumes at the
byte where it stopped, cuts off a sender slower than 16 KiB/s, and verifies every finished layer (size,
sha256, names/dtypes/shapes against the job's schema, finite values) before it enters the store. It reads
continuously (py-libp2p resets a Yamux stream whose reader stalls 5 s) and acks only when the whole model
state is present.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from snakenode import wire
from snakenode.faults import Faults
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.sink import LayerSink, TransferError
from snakenode.layers.store import LayerStore
from snakenode.net.host import StreamIO

CHUNK = 1 << 20  # 1 MiB writes: the measured sweet spot for Noise+Yamux
ACK_TIMEOUT_S = 120.0  # the receiver verifies every layer before acking; large models take a while


@dataclass
class SendItem:
    entry: bundle_mod.LayerEntry
    offset: int = 0
    pack: int | None = None  # bf16-packed from byte 0: the blob's data start (bundle.bf16_data_start)


def _bf16_start(path: str) -> int | None:
    with open(path, "rb") as fh:
        return bundle_mod.bf16_data_start(fh.read())


async def _throttle(t0: float, sent: int, rate: float | None) -> None:
    if rate:
        ahead = sent / rate - (time.monotonic() - t0)
        if ahead > 0:
            await trio.sleep(ahead)


async def send_bundle(io: StreamIO, manifest: bundle_mod.LayerBundle, store: LayerStore, items: list[SendItem],
                      *, rate: float | None = None, faults: Faults | None = None,
                      ctx: Mapping[str, Any] | None = None,
                      on_progress: Callable[[int], None] | None = None, pack_bf16: bool = False) -> dict[str, Any]:
    """Send the manifest and the listed layers; returns the receiver's ack fields. With `pack_bf16` (a job
    with transfer_dtype = "bf16"), layers sent whole whose values are all bfloat16 travel packed."""
    for it in items:
        it.pack = None
        if pack_bf16 and it.offset == 0:
            it.pack = await trio.to_thread.run_sync(_bf16_start, str(store.path(it.entry.hash)))
    await io.write_frame({
        "t": "bundle",
        "manifest": manifest.encode(),
        "send": [{"name": it.entry.name, "hash": it.entry.hash, "offset": it.offset,
                  **({"pack": "bf16"} if it.pack is not None else {})} for it in items],
    })
    t0 = time.monotonic()
    sent = 0
    for it in items:
        path = store.path(it.entry.hash)
        with open(path, "rb") as fh:
            fh.seek(it.offset)
            remaining = it.entry.size - it.offset
            while remaining > 0:
                n = min(CHUNK, remaining)
                if it.pack is not None and fh.tell() < it.pack:
                    n = min(n, it.pack - fh.tell())     # a packed layer's header goes as is, then whole words
                chunk = fh.read(n)
                if len(chunk) != n:
                    raise TransferError(f"layer {it.entry.name} is shorter on disk than its size", "store_corrupt")
                remaining -= len(chunk)
                if it.pack is not None and fh.tell() > it.pack:
                    chunk = bundle_mod.pack_bf16(chunk)
                await io.write(chunk)
                sent += len(chunk)
                if on_progress is not None:
                    on_progress(sent)
                if faults is not None and faults.check("send", bytes=sent, **(ctx or {})) == "break":
                    raise TransferError(f"stream broken on purpose after {sent} bytes (--test-faults)", "test_fault")
                await _throttle(t0, sent, rate)
    kind, f = await io.read_frame(timeout=ACK_TIMEOUT_S)
    if kind == "error":
        raise TransferError(f"receiver refused the bundle: {f.str('error', 1000, required=False)}",
                            f.str("kind", 64, required=False) or "refused")
    if kind != "ack":
        raise TransferError(f"expected ack, got {kind!r}", "unexpected")
    return {"bytes": sent, "seconds": time.monotonic() - t0}


@dataclass
class Incoming:
    manifest: bundle_mod.LayerBundle
    send: list[SendItem]

    @property
    def bytes_expected(self) -> int:
        """Layer bytes to receive (a packed layer's restored size: its data start is not known yet)."""
        return sum(it.entry.size - it.offset for it in self.send)


def decode_incoming(f: wire.Fields, max_layers: int = bundle_mod.MAX_LAYERS) -> Incoming:
    """Strictly decode the `bundle` frame; every layer sent must be listed in the manifest."""
    raw = f.bytes("manifest", max_len=bundle_mod.MAX_MANIFEST_BYTES)
    try:
        manifest = bundle_mod.LayerBundle.decode(raw)
    except bundle_mod.BundleError as exc:
        raise TransferError(f"bad manifest: {exc}", exc.code) from None
    by_name = {e.name: e for e in manifest.layers}
    send_raw = f.raw("send")
    if not isinstance(send_raw, list) or len(send_raw) > max_layers:
        raise TransferError("send must be a list of layers", "malformed")
    items: list[SendItem] = []
    seen: set[str] = set()
    for i, item in enumerate(send_raw):
        g = wire.Fields(item, f"send[{i}]")
        name = g.str("name", 256)
        entry = by_name.get(name)
        if entry is None or g.str("hash", 64) != entry.hash or name in seen:
            raise TransferError(f"send[{i}] names {name!r}, which the manifest does not list (or twice)",
                                "unknown_layer")
        seen.add(name)
        offset = g.int("offset", 0, entry.size)
        pack = g.str("pack", 8, required=False)
        if pack not in ("", "bf16") or (pack and offset):
            raise TransferError(f"send[{i}]: pack must be 'bf16', for a layer sent from byte 0", "malformed")
        items.append(SendItem(entry, offset, 0 if pack else None))
    return Incoming(manifest, items)


async def receive_layers(io: StreamIO, incoming: Incoming, schema: Mapping[str, bundle_mod.LayerEntry],
                         store: LayerStore, *, faults: Faults | None = None, ctx: Mapping[str, Any] | None = None,
                         on_progress: Callable[[int], None] | None = None) -> int:
    """Read the listed layers into the store through the shared layer sink (layers/sink.py: checks, partial
    files, minimum rate, verification). Returns the bytes received."""
    sink = LayerSink(incoming.send, schema, store, faults=faults, ctx=ctx, on_progress=on_progress)
    try:
        while sink.next_layer() is not None:
            while n := sink.want():
                sink.feed(await io.read_some(n))
            await trio.to_thread.run_sync(sink.complete().commit)
    finally:
        with trio.CancelScope(shield=True):  # fsync, or at most one layer's verification
            await trio.to_thread.run_sync(sink.close)
    return sink.received


def plan_send(manifest_layers: list[bundle_mod.LayerEntry], held: set[str], partial: Mapping[str, int]
              ) -> list[SendItem]:
    """The layers a receiver lacks, resuming partial downloads where they stopped."""
    items = []
    for e in manifest_layers:
        if e.hash in held:
            continue
        off = int(partial.get(e.hash, 0))
        items.append(SendItem(e, off if 0 <= off < e.size else 0))
    return items
