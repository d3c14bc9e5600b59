"""bf16 transfer (job key transfer_dtype = "bf16"): bf16-valued F32 layers travel packed (half the bytes)
and arrive bit-exact under their own hash; anything else travels as before."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from snakenode import wire
from snakenode.counters import Counters
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore
from snakenode.net import transfer
from snakenode.net.host import StreamIO


def bf16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (half to even), kept as float32 - what torch's .to(bfloat16) does."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype("<u4").view("<f4")


class _Stream:
    """A trio memory stream dressed as the part of a libp2p stream that StreamIO uses."""

    def __init__(self, s: Any) -> None:
        self.s = s
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_string=lambda: "peer"))

    async def read(self, n: int) -> bytes:
        return await self.s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)


def _layers(rng: np.random.Generator, rounded: bool) -> dict[str, bytes]:
    f = bf16 if rounded else (lambda a: a)
    return {"blocks.0": bundle_mod.encode_blob({"blocks.0.w": f(rng.standard_normal((300, 70)).astype("<f4")),
                                                "blocks.0.b": f(rng.standard_normal(70).astype("<f4"))}),
            "head": bundle_mod.encode_blob({"head.w": f(rng.standard_normal((70, 10)).astype("<f4"))})}


async def _send_and_receive(tmp_path: Path, blobs: dict[str, bytes], pack: bool) -> tuple[int, int, LayerStore]:
    src, dst = LayerStore(tmp_path / "src"), LayerStore(tmp_path / "dst")
    entries = [bundle_mod.layer_entry(n, b) for n, b in blobs.items()]
    for b in blobs.values():
        src.put_bytes(b)
    manifest = bundle_mod.LayerBundle("0123456789abcdef", {}, entries)
    schema = bundle_mod.schema_map(entries)
    a, b = trio.testing.memory_stream_pair()
    sio, rio = StreamIO(_Stream(a), Counters(), "bundle"), StreamIO(_Stream(b), Counters(), "bundle")
    got: dict[str, int] = {}

    async def receiver() -> None:
        kind, f = await rio.read_frame(bundle_mod.MAX_MANIFEST_BYTES + 65536)
        assert kind == "bundle"
        got["n"] = await transfer.receive_layers(rio, transfer.decode_incoming(f), schema, dst)
        await rio.write_frame({"t": "ack"})

    async with trio.open_nursery() as n:
        n.start_soon(receiver)
        res = await transfer.send_bundle(sio, manifest, src, transfer.plan_send(entries, set(), {}), pack_bf16=pack)
    assert res["bytes"] == got["n"] <= rio.bytes_in
    return res["bytes"], sum(len(x) for x in blobs.values()), dst


async def test_bf16_layers_travel_packed_and_arrive_exact(tmp_path: Path) -> None:
    blobs = _layers(np.random.default_rng(0), rounded=True)
    assert all(bundle_mod.bf16_data_start(b) for b in blobs.values())
    sent, size, dst = await _send_and_receive(tmp_path, blobs, pack=True)
    assert sent < 0.52 * size
    for b in blobs.values():
        assert dst.get_bytes(bundle_mod.layer_entry("x", b).hash) == b


@pytest.mark.parametrize(("rounded", "pack"), [(False, True), (True, False)])
async def test_other_layers_and_fp32_jobs_travel_as_before(tmp_path: Path, rounded: bool, pack: bool) -> None:
    blobs = _layers(np.random.default_rng(1), rounded=rounded)
    assert (bundle_mod.bf16_data_start(blobs["head"]) is not None) == rounded
    sent, size, dst = await _send_and_receive(tmp_path, blobs, pack=pack)
    assert sent == size
    assert all(dst.has(bundle_mod.layer_entry("x", b).hash) for b in blobs.values())


def test_pack_roundtrip_and_refusals() -> None:
    x = bf16(np.random.default_rng(2).standard_normal(1000).astype("<f4")).tobytes()
    assert bundle_mod.unpack_bf16(bundle_mod.pack_bf16(x)) == x
    assert len(bundle_mod.pack_bf16(x)) == len(x) // 2
    assert bundle_mod.bf16_data_start(b"garbage") is None
    assert bundle_mod.bf16_data_start(bundle_mod.encode_blob({"i": np.arange(4, dtype="<i4")})) is None
    blob = _layers(np.random.default_rng(3), rounded=True)["head"]
    entry = bundle_mod.layer_entry("head", blob)
    manifest = bundle_mod.LayerBundle("0123456789abcdef", {}, [entry]).encode()
    for item in ({"pack": "bf16", "offset": 8}, {"pack": "fp8", "offset": 0}):
        f = wire.Fields({"manifest": manifest, "send": [{"name": "head", "hash": entry.hash, **item}]}, "bundle")
        with pytest.raises(transfer.TransferError) as exc:
            transfer.decode_incoming(f)
        assert exc.value.kind == "malformed"


def test_a_bf16_job_stores_its_trained_layers_as_bf16_values(tmp_path: Path) -> None:
    from snakenode.train import data as D
    from snakenode.train import engine as E

    job = {"model": "mlp", "model_args": {"hidden": 32, "depth": 2}, "seed": 5, "transfer_dtype": "bf16",
           "train": {"epochs": 1, "batch": 32, "lr": 0.05, "max_steps": 3}, "kd": {"mode": "off"}}
    store = LayerStore(tmp_path)
    eng = E.Engine(store)
    state = eng.model_init(job)["state"]
    data = D.DataSpec.from_flags("digits", "iid", "0/2", 1).to_dict()
    out = eng.train_hop(job, state, [0, 1], True, True, data, None, None, None)
    assert sorted(out["changed"]) == ["blocks.0", "head", "stem"]
    for name in out["changed"]:
        assert bundle_mod.bf16_data_start(store.get_bytes(out["state"][name])) is not None
    assert bundle_mod.bf16_data_start(store.get_bytes(out["state"]["blocks.1"])) is None   # untouched: fp32
    # the worker's in-memory model is what the hashes name: the next hop starts from the rounded values
    again = E.Engine(LayerStore(tmp_path)).train_hop(job, out["state"], [1, 2], False, False, data, None, None, None)
    cached = eng.train_hop(job, out["state"], [1, 2], False, False, data, None, None, None)
    assert again["state"] == cached["state"]
