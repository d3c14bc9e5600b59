"""The shared layer sink (snakenode/layers/sink.py) on its own: no transport, real store files, a clock the
test moves. The transports' end-to-end tests (tests/test_lane.py, tests/test_transfer_bf16.py,
tests/test_security_hostile.py) show the same refusals over real connections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from snakenode.layers import bundle as bundle_mod
from snakenode.layers.sink import MIN_RATE_B_S, MIN_RATE_GRACE_S, LayerSink, TransferError
from snakenode.layers.store import LayerStore


@dataclass
class Item:
    entry: bundle_mod.LayerEntry
    offset: int = 0
    pack: int | None = None


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _blob(seed: int, n: int = 5000, bf16: bool = False) -> bytes:
    a = np.random.default_rng(seed).standard_normal(n).astype("<f4")
    if bf16:
        a = (a.view("<u4") & 0xFFFF0000).view("<f4")
    return bundle_mod.encode_blob({f"blocks.{seed}.w": a})


def _entries(*blobs: bytes) -> list[bundle_mod.LayerEntry]:
    return [bundle_mod.layer_entry(f"blocks.{i}", b) for i, b in enumerate(blobs)]


def _drain(sink: LayerSink, wire_bytes: list[bytes], step: int) -> None:
    """Feed each layer's wire bytes in pieces of at most `step` (and at most what the sink wants)."""
    for data in wire_bytes:
        assert sink.next_layer() is not None
        pos = 0
        while n := sink.want():
            k = min(n, step, len(data) - pos)
            sink.feed(data[pos:pos + k])
            pos += k
        assert pos == len(data)
        sink.complete().commit()
    assert sink.next_layer() is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("step", [1, 3, 4096, 1 << 20])
def test_plain_and_bf16_packed_layers_arrive_exact_whatever_the_read_sizes(tmp_path: Path, step: int) -> None:
    plain, packed_blob = _blob(0, 700), _blob(1, 900, bf16=True)
    entries = _entries(plain, packed_blob)
    start = bundle_mod.bf16_data_start(packed_blob)
    assert start is not None
    packed_wire = packed_blob[:start] + bundle_mod.pack_bf16(packed_blob[start:])
    store = LayerStore(tmp_path)
    sink = LayerSink([Item(entries[0]), Item(entries[1], pack=start)], bundle_mod.schema_map(entries), store)
    _drain(sink, [plain, packed_wire], step)
    sink.close()
    assert store.get_bytes(entries[0].hash) == plain and store.get_bytes(entries[1].hash) == packed_blob
    assert sink.received == len(plain) + len(packed_wire)
    assert not any(store.partial.iterdir())


@pytest.mark.timeout(30)
def test_too_slow_sender_is_cut_off_after_the_grace_period_and_keeps_its_bytes(tmp_path: Path) -> None:
    blob = _blob(0)
    entries = _entries(blob)
    store, clock = LayerStore(tmp_path), Clock()
    sink = LayerSink([Item(entries[0])], bundle_mod.schema_map(entries), store, clock=clock)
    sink.next_layer()
    sink.feed(blob[:10])
    clock.t += MIN_RATE_GRACE_S  # slow, but still within the grace period
    sink.feed(blob[10:20])
    clock.t += 1.0
    with pytest.raises(TransferError) as ei:
        sink.feed(blob[20:30])
    assert ei.value.kind == "too_slow" and f"{MIN_RATE_B_S // 1024} KiB/s" in str(ei.value)
    sink.close()
    assert not store.has(entries[0].hash) and store.partial_offset(entries[0].hash) == 30  # resumable


@pytest.mark.timeout(30)
def test_a_fast_sender_is_never_cut_off(tmp_path: Path) -> None:
    blob = _blob(0, 200_000)
    entries = _entries(blob)
    clock = Clock()
    sink = LayerSink([Item(entries[0])], bundle_mod.schema_map(entries), LayerStore(tmp_path), clock=clock)
    sink.next_layer()
    for i in range(0, len(blob), 64 * 1024):  # 64 KiB a second: four times the minimum
        clock.t += 1.0
        sink.feed(blob[i:i + min(64 * 1024, sink.want())])
    sink.complete().commit()


@pytest.mark.timeout(30)
def test_refusals_name_their_kind(tmp_path: Path) -> None:
    a, b = _blob(0), _blob(1)
    ea, eb = _entries(a, b)
    schema = bundle_mod.schema_map([ea, eb])
    store = LayerStore(tmp_path)

    def first_error(items: list[Item], data: bytes = b"") -> str:
        sink = LayerSink(items, schema, store)
        try:
            sink.next_layer()
            if data:
                sink.feed(data[:sink.want()])
                sink.complete().commit()
        except TransferError as exc:
            return exc.kind
        finally:
            sink.close()
        return "none"

    stranger = bundle_mod.LayerEntry("blocks.9", ea.hash, ea.size, ea.tensors)
    assert first_error([Item(stranger)]) == "unknown_layer"
    assert first_error([Item(bundle_mod.LayerEntry(ea.name, ea.hash, ea.size + 4, ea.tensors))]) == "oversize"
    assert first_error([Item(ea, offset=100)]) == "offset_mismatch"
    lying = bundle_mod.LayerEntry(ea.name, eb.hash, ea.size, ea.tensors)  # a's bytes under b's hash
    assert first_error([Item(lying)], a) == "hash_mismatch"
    assert not store.partial_offset(eb.hash)  # the bad bytes are gone: the next attempt starts at 0
    assert first_error([Item(ea, pack=0)], (10**9).to_bytes(8, "little")) == "malformed"
    store.put_bytes(a)
    assert first_error([Item(ea)]) == "unexpected"  # sent although we hold it


@pytest.mark.timeout(30)
def test_a_layer_stopped_at_when_complete_is_committed_not_left_complete(tmp_path: Path) -> None:
    blob = _blob(0)
    entries = _entries(blob)
    store = LayerStore(tmp_path)
    sink = LayerSink([Item(entries[0])], bundle_mod.schema_map(entries), store)
    sink.next_layer()
    sink.feed(blob)  # every byte is in; the transport fails before it commits
    sink.close()
    assert store.has(entries[0].hash) and not any(store.partial.iterdir())
