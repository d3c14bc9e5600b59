"""Layer blobs and bundles (torch-free): the canonical safetensors codec, blob verification against a
layer schema, the LayerBundle manifest codec and the merged model file of `snakenode fetch`.

Why our own safetensors writer: a layer's version is sha256 of its blob, so every node must serialise the
same tensors to the same bytes whatever library versions it runs. `encode_blob` fixes the layout (tensors
sorted by name, compact JSON header with sorted keys, padded with spaces to 8 bytes, no metadata); the
worker uses it too. Any safetensors reader can read the result.

Why strict parsing: blobs arrive from peers. Nothing here trusts a length, an offset or a dtype before
checking it, and every rejection is a BundleError subclass with a `code` (for counters) and a message
that names the layer.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import msgpack
import numpy as np

from snakenode.layers.store import sha256_hex

# safetensors dtype -> (numpy dtype used to read it, bytes per element). BF16 has no numpy dtype: it is
# read as little-endian uint16 and checked through its exponent bits.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1), "U8": ("u1", 1),
    "BOOL": ("?", 1),
}
_NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
             np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
             np.dtype("?"): "BOOL"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 4096
MAX_TENSORS_PER_LAYER = 4096


class BundleError(Exception):
    """A blob or manifest that must not touch the model. `code` names the problem, `layer` the layer."""

    code = "bundle_error"

    def __init__(self, layer: str | None, detail: str) -> None:
        self.layer = layer
        self.detail = detail
        where = f"layer {layer}" if layer else "bundle"
        super().__init__(f"{self.code}: {where}: {detail}")


class HashMismatch(BundleError):
    code = "hash_mismatch"


class ShapeMismatch(BundleError):
    """Shapes, or the set of tensor names, differ from the model's schema."""

    code = "shape_mismatch"


class DtypeMismatch(BundleError):
    code = "dtype_mismatch"


class NonFinite(BundleError):
    code = "non_finite"


class UnknownLayer(BundleError):
    code = "unknown_layer"


class Truncated(BundleError):
    code = "truncated"


class Oversize(BundleError):
    code = "oversize"


class BadHeader(BundleError):
    code = "bad_header"


ERROR_CODES = tuple(c.code for c in (HashMismatch, ShapeMismatch, DtypeMismatch, NonFinite, UnknownLayer,
                                      Truncated, Oversize, BadHeader))


# ---------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int            # offsets relative to the start of the data section
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int       # absolute offset of the data section (8 + header length)
    data_len: int


def parse_header(buf: bytes | memoryview, total_len: int | None = None, layer: str | None = None) -> Header:
    """Parse and validate a safetensors header. `buf` needs only the first 8 + header bytes; `total_len`
    is the blob's full length (default len(buf)). Checks that offsets tile the data section exactly."""
    total = len(buf) if total_len is None else total_len
    if len(buf) < 8:
        raise Truncated(layer, f"{len(buf)} bytes, shorter than the 8-byte safetensors length prefix")
    (hlen,) = struct.unpack("<Q", bytes(buf[:8]))
    if hlen > MAX_HEADER_BYTES:
        raise BadHeader(layer, f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
    if 8 + hlen > len(buf) or 8 + hlen > total:
        raise Truncated(layer, f"header needs {8 + hlen} bytes, blob has {min(len(buf), total)}")
    raw = bytes(buf[8:8 + hlen])
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: deeply nested JSON
        raise BadHeader(layer, f"header is not UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise BadHeader(layer, "header is not a JSON object")
    meta = doc.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise BadHeader(layer, "__metadata__ must map strings to strings")
    if len(doc) > 1_000_000:
        raise BadHeader(layer, "too many tensors")
    tensors: dict[str, TensorInfo] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BadHeader(layer, f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise DtypeMismatch(layer, f"tensor {name!r}: unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(s) is int and 0 <= s < 2**40 for s in shape)):
            raise BadHeader(layer, f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int and 0 <= o for o in offs) or offs[0] > offs[1]):
            raise BadHeader(layer, f"tensor {name!r}: bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * DTYPES[dt][1]
        if offs[1] - offs[0] != nbytes:
            raise BadHeader(layer, f"tensor {name!r}: offsets span {offs[1] - offs[0]} bytes, "
                                   f"{dt}{shape} needs {nbytes}")
        tensors[name] = TensorInfo(dt, tuple(shape), offs[0], offs[1])
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            raise BadHeader(layer, f"tensor {name!r}: data at {t.begin}, expected {pos} (gap or overlap)")
        pos = t.end
    data_len = total - 8 - hlen
    if data_len < pos:
        raise Truncated(layer, f"data section has {data_len} bytes, header describes {pos}")
    if data_len > pos:
        raise Oversize(layer, f"{data_len - pos} bytes after the last tensor")
    return Header(tensors, meta, 8 + hlen, data_len)


# ---------------------------------------------------------------------------------------------- codec


def _header_bytes(entries: Mapping[str, tuple[str, tuple[int, ...], int, int]],
                  metadata: Mapping[str, str] | None) -> bytes:
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = dict(sorted(metadata.items()))
    for name in sorted(entries):
        dt, shape, b, e = entries[name]
        doc[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [b, e]}
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def encode_blob(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Canonical safetensors bytes: the same tensors always give the same bytes (hence the same hash)."""
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    chunks: list[bytes] = []
    pos = 0
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    for name in sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n)):   # aligned, like safetensors
        arr = arrays[name]
        dt = _NP_TO_ST.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if dt is None:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent")
        data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[dt][0])).tobytes()
        entries[name] = (dt, tuple(int(s) for s in arr.shape), pos, pos + len(data))
        chunks.append(data)
        pos += len(data)
    return _header_bytes(entries, metadata) + b"".join(chunks)


def decode_blob(blob: bytes | memoryview, layer: str | None = None) -> dict[str, np.ndarray]:
    """Tensors of a blob as read-only numpy arrays (BF16 as raw uint16)."""
    h = parse_header(blob, layer=layer)
    mv = memoryview(blob)
    out: dict[str, np.ndarray] = {}
    for name, t in h.tensors.items():
        npdt, _ = DTYPES[t.dtype]
        out[name] = np.frombuffer(mv[h.data_start + t.begin:h.data_start + t.end], dtype=npdt).reshape(t.shape)
    return out


# ---------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class LayerEntry:
    """One layer as the worker reports it and a manifest lists it."""

    name: str
    hash: str
    size: int
    tensors: dict[str, dict[str, Any]]     # tensor name -> {"dtype": "F32", "shape": [..]}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hash": self.hash, "size": self.size,
                "tensors": {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in self.tensors.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> LayerEntry:
        if not isinstance(d, dict) or set(d) != {"name", "hash", "size", "tensors"}:
            raise BadHeader(None, f"layer entry needs exactly name, hash, size, tensors; got {_keys(d)}")
        name, h, size, tensors = d["name"], d["hash"], d["size"], d["tensors"]
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise BadHeader(None, f"bad layer name {name!r}")
        if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise BadHeader(name, f"bad hash {h!r}")
        if type(size) is not int or not 0 < size < 2**40:
            raise BadHeader(name, f"bad size {size!r}")
        if not isinstance(tensors, dict) or not 0 < len(tensors) <= MAX_TENSORS_PER_LAYER:
            raise BadHeader(name, "tensors must be a non-empty map")
        clean: dict[str, dict[str, Any]] = {}
        for tn, info in tensors.items():
            if (not isinstance(tn, str) or not isinstance(info, dict) or set(info) != {"dtype", "shape"}
                    or not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES or not isinstance(info["shape"], list | tuple)
                    or not all(type(s) is int and s >= 0 for s in info["shape"])):
                raise BadHeader(name, f"bad tensor entry {tn!r}: {info!r}")
            clean[tn] = {"dtype": info["dtype"], "shape": list(info["shape"])}
        return cls(name, h, size, clean)


def _keys(d: Any) -> Any:
    return sorted(d) if isinstance(d, dict) else type(d).__name__


def layer_entry(name: str, blob: bytes) -> LayerEntry:
    """The schema entry of a blob (what the worker reports at model_init)."""
    h = parse_header(blob, layer=name)
    return LayerEntry(name, sha256_hex(blob), len(blob),
                      {k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in sorted(h.tensors.items())})


# --- bf16 transfer (job key transfer_dtype = "bf16") --------------------------------------------------
# A bf16 job rounds every trained layer to bfloat16 values at the end of its hop (the worker trains in fp32)
# but keeps storing it as F32, so versions, schemas and checks do not change. Such a blob travels packed:
# its header as is, then only the high 16 bits of every 32-bit word of the data section (the low halves
# are zero). The receiver restores the exact F32 bytes and verifies their sha256 as for any layer.


def bf16_data_start(blob: bytes | memoryview) -> int | None:
    """Where the data section starts when `blob` can travel packed without loss (every tensor F32, every
    word's low 16 bits zero); None when it cannot."""
    try:
        h = parse_header(blob)
    except BundleError:
        return None
    if not h.tensors or any(t.dtype != "F32" for t in h.tensors.values()) or h.data_len % 4:
        return None
    words = np.frombuffer(memoryview(blob)[h.data_start:h.data_start + h.data_len], dtype="<u2")
    return None if words[0::2].any() else h.data_start


def pack_bf16(data: bytes | memoryview) -> bytes:
    """The high halves of the little-endian 32-bit words of `data` (len(data) % 4 == 0)."""
    return np.frombuffer(data, dtype="<u2")[1::2].tobytes()


def unpack_bf16(packed: bytes | memoryview) -> bytes:
    """Inverse of pack_bf16 (len(packed) % 2 == 0)."""
    hi = np.frombuffer(packed, dtype="<u2")
    out = np.zeros(2 * len(hi), dtype="<u2")
    out[1::2] = hi
    return out.tobytes()


def check_finite(blob: bytes | memoryview, header: Header, layer: str | None = None) -> None:
    mv = memoryview(blob)
    for name, t in header.tensors.items():
        if t.dtype not in FLOAT_DTYPES or t.begin == t.end:
            continue
        npdt, _ = DTYPES[t.dtype]
        a = np.frombuffer(mv[header.data_start + t.begin:header.data_start + t.end], dtype=npdt)
        if t.dtype == "BF16":
            bad = int(np.count_nonzero((a & 0x7F80) == 0x7F80))
        else:
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise NonFinite(layer, f"tensor {name!r} has {bad} NaN/Inf value(s)")


def verify_blob(blob: bytes | memoryview, expected: LayerEntry | Mapping[str, Any],
                expected_hash: str | None = None, schema: LayerEntry | Mapping[str, Any] | None = None,
                check_values: bool = True) -> Header:
    """Check one blob before it enters the store: size, header, names/dtypes/shapes against the model's
    `schema` entry for this layer (default: `expected` itself), sha256 against `expected_hash` (default:
    `expected.hash`, i.e. the manifest's), and finiteness of float values."""
    exp = expected if isinstance(expected, LayerEntry) else LayerEntry.from_dict(dict(expected))
    sch = exp if schema is None else (schema if isinstance(schema, LayerEntry) else LayerEntry.from_dict(dict(schema)))
    layer = exp.name
    want_hash = exp.hash if expected_hash is None else expected_hash
    n = len(blob)
    header = parse_header(blob, layer=layer)
    got = {k: (t.dtype, list(t.shape)) for k, t in header.tensors.items()}
    want = {k: (v["dtype"], list(v["shape"])) for k, v in sch.tensors.items()}
    if set(got) != set(want):
        raise ShapeMismatch(layer, f"tensor names differ from the model: missing {sorted(set(want) - set(got))}, "
                                   f"unexpected {sorted(set(got) - set(want))}")
    for k, (dt, shape) in sorted(got.items()):
        if dt != want[k][0]:
            raise DtypeMismatch(layer, f"tensor {k!r} is {dt}, the model has {want[k][0]}")
        if shape != want[k][1]:
            raise ShapeMismatch(layer, f"tensor {k!r} has shape {shape}, the model has {want[k][1]}")
    if n != sch.size:      # right tensors, wrong length: a non-canonical header
        raise (Oversize if n > sch.size else Truncated)(layer, f"{n} bytes, the model's layer is {sch.size}")
    h = sha256_hex(blob)
    if h != want_hash:
        raise HashMismatch(layer, f"bytes hash to {h[:16]}, expected {want_hash[:16]}")
    if check_values:
        check_finite(blob, header, layer)
    return header


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class LayerBundle:
    """The manifest of a bundle: which job, the job_state travelling with the snake, and the layers sent
    (their blobs follow on the stream, each checked with `verify_blob`)."""

    job: str
    job_state: dict[str, Any]
    layers: list[LayerEntry] = field(default_factory=list)

    def encode(self) -> bytes:
        return msgpack.packb({"job": self.job, "job_state": self.job_state,
                              "layers": [entry.to_dict() for entry in self.layers]}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = MAX_MANIFEST_BYTES) -> LayerBundle:
        if len(data) > max_bytes:
            raise Oversize(None, f"manifest is {len(data)} bytes, limit {max_bytes}")
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True,
                                  max_array_len=MAX_LAYERS * 8, max_map_len=MAX_TENSORS_PER_LAYER * 2)
        except Exception as e:  # msgpack raises several types for malformed input
            raise BadHeader(None, f"manifest is not valid msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(doc, dict) or set(doc) != {"job", "job_state", "layers"}:
            raise BadHeader(None, f"manifest needs exactly job, job_state, layers; got {_keys(doc)}")
        if not isinstance(doc["job"], str) or not 0 < len(doc["job"]) <= 256:
            raise BadHeader(None, "manifest job must be a non-empty string")
        if not isinstance(doc["job_state"], dict):
            raise BadHeader(None, "manifest job_state must be a map")
        if not isinstance(doc["layers"], list) or len(doc["layers"]) > MAX_LAYERS:
            raise BadHeader(None, f"manifest layers must be a list of at most {MAX_LAYERS}")
        layers = [LayerEntry.from_dict(x) for x in doc["layers"]]
        names = [entry.name for entry in layers]
        if len(set(names)) != len(names):
            raise BadHeader(None, "manifest lists a layer twice")
        return cls(doc["job"], doc["job_state"], layers)

    def check_against(self, schema: Mapping[str, LayerEntry | Mapping[str, Any]]) -> None:
        """Every listed layer exists in the model and declares the model's tensors (before any byte moves)."""
        for entry in self.layers:
            if entry.name not in schema:
                raise UnknownLayer(entry.name, "not a layer of this job's model")
            s = schema[entry.name]
            sch = s if isinstance(s, LayerEntry) else LayerEntry.from_dict(dict(s))
            if entry.size != sch.size:
                cls_ = Oversize if entry.size > sch.size else Truncated
                raise cls_(entry.name, f"announced size {entry.size}, the model's layer is {sch.size}")
            for k, v in sch.tensors.items():
                mine = entry.tensors.get(k)
                if mine is None:
                    raise ShapeMismatch(entry.name, f"tensor {k!r} missing from the manifest")
                if mine["dtype"] != v["dtype"]:
                    raise DtypeMismatch(entry.name, f"tensor {k!r} is {mine['dtype']}, the model has {v['dtype']}")
                if list(mine["shape"]) != list(v["shape"]):
                    raise ShapeMismatch(entry.name, f"tensor {k!r} has shape {mine['shape']}, the model has "
                                                    f"{v['shape']}")
            extra = set(entry.tensors) - set(sch.tensors)
            if extra:
                raise ShapeMismatch(entry.name, f"unexpected tensors {sorted(extra)}")


def schema_map(layers: Iterable[LayerEntry | Mapping[str, Any]]) -> dict[str, LayerEntry]:
    """The worker's `model_init` layer list as {name: LayerEntry}."""
    out = {}
    for x in layers:
        e = x if isinstance(x, LayerEntry) else LayerEntry.from_dict(dict(x))
        out[e.name] = e
    return out


# ---------------------------------------------------------------------------------------------- poisoning guard


# Normalisation statistics are not trained: their scale follows the layer's inputs (a BatchNorm running_var
# went from 1 to ~150 per channel in one honest CNN hop while its weights moved 0.6x), so they stay out of
# the change bound; the validation-loss bound still sees what they do to the model.
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def relative_change(old_blob: bytes, new_blob: bytes, layer: str | None = None) -> float:
    """||new - old|| / ||old|| over the trained float tensors of one layer (float64 accumulation; not the
    normalisation statistics, see STATISTICS_SUFFIXES). A layer that moves far more than training could move
    it in one hop is suspect. 0-norm old layers give inf on change."""
    old, new = decode_blob(old_blob, layer), decode_blob(new_blob, layer)
    if set(old) != set(new):
        raise ShapeMismatch(layer, "the two blobs hold different tensors")
    num = den = 0.0
    for k in sorted(old):
        a, b = old[k], new[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ShapeMismatch(layer, f"tensor {k!r}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
        if a.dtype.kind != "f" or k.endswith(STATISTICS_SUFFIXES):
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        num += float(np.sum((b64 - a64) ** 2))
        den += float(np.sum(a64 ** 2))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num) / math.sqrt(den)


# ---------------------------------------------------------------------------------------------- model file

_META_LAYERS = "snakenode.layers"


def write_model_file(out: IO[bytes], layers: Iterable[tuple[str, bytes | IO[bytes]]],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Merge layer blobs (in order) into one safetensors file, byte-level: headers are combined and the data
    sections copied, so a 5 GB model streams from the store without loading torch. The layer -> hash map
    goes into the metadata so `read_model_file` can split it back into hash-identical blobs."""
    parts: list[tuple[str, Header, bytes | IO[bytes]]] = []
    for name, src in layers:
        if isinstance(src, bytes | bytearray | memoryview):
            hdr = parse_header(src, layer=name)
        else:
            src.seek(0, 2)
            total = src.tell()
            src.seek(0)
            (hlen,) = struct.unpack("<Q", src.read(8))
            if hlen > MAX_HEADER_BYTES:
                raise BadHeader(name, f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
            src.seek(0)
            hdr = parse_header(src.read(8 + hlen), total, layer=name)
        parts.append((name, hdr, src))
    # Tensors are laid out globally by (itemsize desc, name) so every tensor stays aligned for zero-copy readers.
    flat: list[tuple[str, str, TensorInfo, int]] = []       # (tensor, layer, info, part index)
    layer_map: dict[str, list[str]] = {}
    seen: set[str] = set()
    for i, (name, hdr, _) in enumerate(parts):
        layer_map[name] = sorted(hdr.tensors)
        for tn, t in hdr.tensors.items():
            if tn in seen:
                raise BadHeader(name, f"tensor {tn!r} appears in two layers")
            seen.add(tn)
            flat.append((tn, name, t, i))
    flat.sort(key=lambda x: (-DTYPES[x[2].dtype][1], x[0]))
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    pos = 0
    for tn, _layer, t, _i in flat:
        entries[tn] = (t.dtype, t.shape, pos, pos + t.end - t.begin)
        pos += t.end - t.begin
    meta = dict(metadata or {})
    meta[_META_LAYERS] = json.dumps(layer_map, separators=(",", ":"), sort_keys=True)
    out.write(_header_bytes(entries, meta))
    for _tn, layer, t, i in flat:
        _name, hdr, src = parts[i]
        start = hdr.data_start + t.begin
        if isinstance(src, bytes | bytearray | memoryview):
            out.write(memoryview(src)[start:hdr.data_start + t.end])
            continue
        src.seek(start)
        left = t.end - t.begin
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise Truncated(layer, "blob file shorter than its header says")
            out.write(chunk)
            left -= len(chunk)


def merge_blobs(layers: Iterable[tuple[str, bytes]], metadata: Mapping[str, str] | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    write_model_file(buf, layers, metadata)
    return buf.getvalue()


def read_model_file(data: bytes | memoryview) -> tuple[dict[str, bytes], dict[str, str]]:
    """Split a merged model file back into canonical layer blobs: ({layer: blob}, metadata). Each blob
    re-encodes exactly as the store holds it, so its sha256 is the layer's version."""
    h = parse_header(data)
    meta = dict(h.metadata or {})
    try:
        layer_map = json.loads(meta.pop(_META_LAYERS))
    except (KeyError, ValueError, RecursionError):
        raise BadHeader(None, f"not a snakenode model file (no {_META_LAYERS} metadata)") from None
    if not isinstance(layer_map, dict):
        raise BadHeader(None, f"{_META_LAYERS} metadata must be a JSON object")
    arrays = decode_blob(data)
    blobs: dict[str, bytes] = {}
    for layer, names in layer_map.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and n in arrays for n in names):
            raise BadHeader(layer, "metadata lists tensors the file does not hold")
        tensors = {n: arrays[n] for n in names}
        if any(h.tensors[n].dtype == "BF16" for n in names):
            raise DtypeMismatch(layer, "BF16 tensors cannot be re-encoded as canonical F32 blobs")
        blobs[layer] = encode_blob(tensors)
    return blobs, meta
