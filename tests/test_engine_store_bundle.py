"""layers/store.py and layers/bundle.py: content-addressed blobs, resumable partials, blob verification with
named errors, the manifest codec, the merged model file and the poisoning guard."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import safetensors.numpy

from snakenode.layers import bundle as B
from snakenode.layers.store import BlobHashMismatch, LayerStore, StoreError


def _layer(seed: int = 0, name: str = "blocks.1") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{name}.fc.weight": rng.normal(size=(4, 3)).astype(np.float32),
            f"{name}.fc.bias": rng.normal(size=(4,)).astype(np.float32),
            f"{name}.bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def test_canonical_blob_is_deterministic_and_standard() -> None:
    t = _layer()
    b1 = B.encode_blob(t)
    b2 = B.encode_blob(dict(reversed(list(t.items()))))
    assert b1 == b2
    back = safetensors.numpy.load(b1)
    assert set(back) == set(t) and all(np.array_equal(back[k], t[k]) for k in t)
    dec = B.decode_blob(b1)
    assert np.array_equal(dec["blocks.1.fc.weight"], t["blocks.1.fc.weight"])
    (hlen,) = struct.unpack("<Q", b1[:8])
    assert (8 + hlen) % 8 == 0


def test_store_put_get_gc(tmp_path: Path) -> None:
    s = LayerStore(tmp_path / "store")
    b = B.encode_blob(_layer())
    h = s.put_bytes(b)
    assert h == hashlib.sha256(b).hexdigest() and s.has(h) and s.get_bytes(h) == b
    assert s.path(h) == tmp_path / "store" / "blobs" / f"{h}.safetensors"
    with pytest.raises(BlobHashMismatch, match="hash_mismatch"):
        s.put_bytes(b + b" ", expected_hash=h)
    with pytest.raises(StoreError, match="64 lowercase hex"):
        s.path("../../etc/passwd")
    h2 = s.put_bytes(B.encode_blob(_layer(1)))
    assert s.gc(keep=[h2]) == len(b)
    assert not s.has(h) and s.has(h2)
    with pytest.raises(StoreError, match="not in the store"):
        s.get_bytes(h)


def test_store_partial_resume(tmp_path: Path) -> None:
    s = LayerStore(tmp_path)
    b = B.encode_blob(_layer(2))
    h = hashlib.sha256(b).hexdigest()
    with s.open_partial(h, size=len(b)) as p:
        assert p.offset == 0
        p.write(b[:50])
    p2 = s.open_partial(h, size=len(b))         # the transfer broke: resume at 50
    assert p2.offset == 50 == s.partial_offset(h)
    p2.write(b[50:])
    with pytest.raises(StoreError, match="oversize"):
        p2.write(b"x")
    assert s.commit_partial(p2) == h and s.get_bytes(h) == b
    assert not s.partial_path(h).exists()
    # a corrupt resumed download is deleted and named
    other = B.encode_blob(_layer(3))
    ho = hashlib.sha256(other).hexdigest()
    with s.open_partial(ho) as p3:
        p3.write(other[:-1] + b"\0")
    with pytest.raises(BlobHashMismatch, match="hash_mismatch"):
        s.commit_partial(ho)
    assert not s.has(ho) and s.partial_offset(ho) == 0


def _entry(blob: bytes, name: str = "blocks.1") -> B.LayerEntry:
    return B.layer_entry(name, blob)


def test_bundle_round_trip(tmp_path: Path) -> None:
    blobs = {n: B.encode_blob(_layer(i, n)) for i, n in enumerate(["stem", "blocks.0", "blocks.1", "head"])}
    schema = B.schema_map(_entry(b, n).to_dict() for n, b in blobs.items())
    m = B.LayerBundle("job1", {"hop": 3, "attempt": 0, "window": {"start": 0, "size": 1, "dir": 1}},
                      [schema["blocks.1"], schema["head"]])
    data = m.encode()
    back = B.LayerBundle.decode(data)
    assert back.job == "job1" and back.job_state["hop"] == 3
    assert [e.name for e in back.layers] == ["blocks.1", "head"]
    back.check_against(schema)
    store = LayerStore(tmp_path)
    for e in back.layers:
        B.verify_blob(blobs[e.name], e, schema=schema[e.name])
        store.put_bytes(blobs[e.name], e.hash)
    assert all(store.has(e.hash) for e in back.layers)
    # merged model file round trip (byte-level) and readable by safetensors
    with open(tmp_path / "m.safetensors", "wb") as f, \
            open(store.path(schema["head"].hash), "rb") as fh:
        B.write_model_file(f, [("stem", blobs["stem"]), ("blocks.0", blobs["blocks.0"]),
                               ("blocks.1", blobs["blocks.1"]), ("head", fh)], {"job": "job1"})
    data = (tmp_path / "m.safetensors").read_bytes()
    arrays = safetensors.numpy.load(data)
    assert len(arrays) == 12
    split, meta = B.read_model_file(data)
    assert meta == {"job": "job1"}
    assert {n: hashlib.sha256(b).hexdigest() for n, b in split.items()} == {n: e.hash for n, e in schema.items()}


def _rehead(blob: bytes, mutate) -> bytes:  # type: ignore[no-untyped-def]
    (hlen,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8:8 + hlen])
    mutate(doc)
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[8 + hlen:]


def test_each_corruption_rejected_with_named_error() -> None:
    good = B.encode_blob(_layer())
    e = _entry(good)
    B.verify_blob(good, e)

    def expect(cls: type[B.BundleError], blob: bytes, entry: B.LayerEntry = e, **kw: object) -> None:
        with pytest.raises(cls) as info:
            B.verify_blob(blob, entry, **kw)  # type: ignore[arg-type]
        assert str(info.value).startswith(f"{cls.code}: layer blocks.1:")
        assert info.value.layer == "blocks.1"

    flipped = bytearray(good)
    flipped[-20] ^= 1
    expect(B.HashMismatch, bytes(flipped))
    expect(B.Truncated, good[:-4])
    expect(B.Truncated, good[:5])
    expect(B.Oversize, good + b"\0\0\0\0")
    expect(B.BadHeader, good[:8] + b"}" + good[9:])
    expect(B.BadHeader, struct.pack("<Q", 2**40) + good[8:])
    bad = _layer()
    bad["blocks.1.fc.weight"] = np.zeros((3, 4), np.float32)
    expect(B.ShapeMismatch, B.encode_blob(bad))
    bad = _layer()
    bad["blocks.1.fc.weight"] = np.zeros((4, 3), np.float64)[:, :2]
    bad["blocks.1.fc.weight"] = np.zeros((4, 3), np.float16)
    expect(B.DtypeMismatch, B.encode_blob(bad), B.LayerEntry(e.name, e.hash, 10**6, e.tensors))
    bad = _layer()
    bad["blocks.1.other"] = bad.pop("blocks.1.fc.bias")
    expect(B.ShapeMismatch, B.encode_blob(bad))
    for val in (np.nan, np.inf):
        bad = _layer()
        bad["blocks.1.fc.bias"][2] = val
        nb = B.encode_blob(bad)
        expect(B.NonFinite, nb, _entry(nb))
    # dtype unknown to safetensors, and offsets that overlap
    expect(B.DtypeMismatch, _rehead(good, lambda d: d["blocks.1.fc.bias"].update(dtype="Q9")))
    expect(B.BadHeader, _rehead(good, lambda d: d["blocks.1.fc.bias"].update(
        data_offsets=d["blocks.1.fc.weight"]["data_offsets"][:1] + [d["blocks.1.fc.weight"]["data_offsets"][0] + 16])))
    # manifests: unknown layer, wrong announced shape, garbage
    schema = {"blocks.1": e}
    with pytest.raises(B.UnknownLayer, match="unknown_layer: layer blocks.9"):
        B.LayerBundle("j", {}, [B.LayerEntry("blocks.9", e.hash, e.size, e.tensors)]).check_against(schema)
    wrong = {**e.tensors, "blocks.1.fc.bias": {"dtype": "F32", "shape": [5]}}
    with pytest.raises(B.ShapeMismatch, match="shape_mismatch: layer blocks.1: tensor 'blocks.1.fc.bias'"):
        B.LayerBundle("j", {}, [B.LayerEntry("blocks.1", e.hash, e.size, wrong)]).check_against(schema)
    with pytest.raises(B.Oversize, match="oversize: layer blocks.1"):
        B.LayerBundle("j", {}, [B.LayerEntry("blocks.1", e.hash, e.size + 1, e.tensors)]).check_against(schema)
    with pytest.raises(B.BadHeader, match="bad_header"):
        B.LayerBundle.decode(b"\xc1\xc1")
    with pytest.raises(B.BadHeader, match="bad hash"):
        B.LayerBundle.decode(msgpack.packb({"job": "j", "job_state": {}, "layers": [
            {"name": "x", "hash": "../x", "size": 1, "tensors": {}}]}))
    with pytest.raises(B.Oversize):
        B.LayerBundle.decode(b"\0" * (B.MAX_MANIFEST_BYTES + 1))


def test_bf16_and_f16_finiteness() -> None:
    ok = np.array([0x3F80, 0x0000, 0x8000, 0x7F7F], dtype=np.uint16)    # 1.0, 0, -0, max finite
    bad = np.array([0x3F80, 0x7F80], dtype=np.uint16)                   # 1.0, +inf
    raw = ok.tobytes()
    hdr = {"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, len(raw)]}}
    h = json.dumps(hdr).encode()
    blob = struct.pack("<Q", len(h)) + h + raw
    B.check_finite(blob, B.parse_header(blob), "x")
    raw = bad.tobytes()
    hdr = {"t": {"dtype": "BF16", "shape": [2], "data_offsets": [0, len(raw)]}}
    h = json.dumps(hdr).encode()
    blob = struct.pack("<Q", len(h)) + h + raw
    with pytest.raises(B.NonFinite, match="non_finite: layer x"):
        B.check_finite(blob, B.parse_header(blob), "x")
    f16 = B.encode_blob({"t": np.array([1.0, np.nan], np.float16)})
    with pytest.raises(B.NonFinite):
        B.check_finite(f16, B.parse_header(f16), "y")


def test_relative_change() -> None:
    a = _layer(0)
    b = {k: (v * 1.1 if v.dtype.kind == "f" else v + 1) for k, v in a.items()}
    assert B.relative_change(B.encode_blob(a), B.encode_blob(b)) == pytest.approx(0.1, rel=1e-5)
    assert B.relative_change(B.encode_blob(a), B.encode_blob(a)) == 0.0
    with pytest.raises(B.ShapeMismatch):
        B.relative_change(B.encode_blob(a), B.encode_blob(_layer(0, "blocks.2")), "blocks.1")


def test_relative_change_ignores_normalisation_statistics_but_not_weights() -> None:
    """Measured in an honest CNN hop: running_var 1 -> ~150 per channel while the weights moved 0.6x."""
    a = {**_layer(0), "blocks.1.bn.running_var": np.ones(4, np.float32),
         "blocks.1.bn.running_mean": np.zeros(4, np.float32)}
    honest = {**a, "blocks.1.bn.running_var": np.full(4, 150.0, np.float32),
              "blocks.1.bn.running_mean": np.full(4, 12.0, np.float32)}
    assert B.relative_change(B.encode_blob(a), B.encode_blob(honest)) == 0.0
    poisoned = {**honest, "blocks.1.fc.weight": a["blocks.1.fc.weight"] * 1000}
    assert B.relative_change(B.encode_blob(a), B.encode_blob(poisoned)) > 100


def test_merge_streams_from_files(tmp_path: Path) -> None:
    blob = B.encode_blob(_layer(5))
    buf = io.BytesIO()
    B.write_model_file(buf, [("blocks.1", io.BytesIO(blob))])
    split, _ = B.read_model_file(buf.getvalue())
    assert split["blocks.1"] == blob
