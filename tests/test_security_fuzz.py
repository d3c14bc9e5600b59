"""Issue 7: property-based fuzzing of every decoder that sees bytes or values from outside the process.

Property, for each decoder: any input either decodes or raises the module's own documented error type
(WireError, StateError, JobRejected, BundleError, TransferError, FaultSpecError, ConfigError, ...) —
never another exception (a TypeError or RecursionError escaping a decoder becomes an "internal error" in
a handler: no named error for the sender, the wrong counter, an ERROR log line per attacker message),
never hangs (each call is timed), and never allocates much (each call's peak allocation is traced).

Inputs are (a) random values and bytes, (b) valid messages mutated at one to three places (a field
replaced by a random value, deleted, added, or the encoded bytes flipped, cut or extended), so the
fuzzer gets past the first checks and into the deep ones, and (c) hand-written examples of inputs that
once got through. Runs are derandomized (the same examples every run: no flaky tests); set
SNAKENODE_FUZZ_RANDOM=1 to explore new ones, and SNAKENODE_FUZZ_EXAMPLES=N for longer runs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from snakenode import config, faults, profile, wire
from snakenode.identity import Identity
from snakenode.layers import bundle
from snakenode.net import lane, transfer
from snakenode.snake import hoplog
from snakenode.snake import state as state_mod
from snakenode.snake.job import SIGN_DOMAIN, JobRejected, SignedJob, sign_job, validate_spec, verify_job
from snakenode.snake.messages import Accept, ClaimRef, Decline, Propose
from snakenode.snake.window import Window, WindowError

EXAMPLES = int(os.environ.get("SNAKENODE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("SNAKENODE_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
FEW = settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
MAX_SECONDS = 5.0  # per decoder call on inputs of at most ~64 KiB: far above the real cost (~ms)
MAX_ALLOC = 32 * 2**20  # peak bytes one decoder call may allocate for such an input

# ---------------------------------------------------------------------------------------------- fixtures

SUBMITTER = Identity(Ed25519PrivateKey.generate())
PEERS = [Identity(Ed25519PrivateKey.generate()).peer_id for _ in range(3)]
JOB_SPEC = {"model": "mlp", "dataset": "digits", "laps": 2, "window": {"max_blocks": 2}}
SIGNED = sign_job(JOB_SPEC, SUBMITTER)
JOB_ID = SIGNED.job_id
STATE0 = state_mod.start_job(JOB_ID, PEERS, PEERS[0], 2, 4)
STATE1 = state_mod.after_hop(state_mod.finish_hop(STATE0, metric=0.5, members=PEERS), PEERS[1], 1,
                             spec=SIGNED.spec)
H = "ab" * 32
BLOB = bundle.encode_blob({"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                           "b": np.zeros(4, dtype=np.float32), "steps": np.array([3], dtype=np.int64)})
ENTRY = bundle.layer_entry("block0", BLOB)
BLOB2 = bundle.encode_blob({"x": np.ones((2, 2), dtype=np.float16)})
ENTRY2 = bundle.layer_entry("head", BLOB2)
MANIFEST = bundle.LayerBundle(JOB_ID, STATE1.to_dict(), [ENTRY, ENTRY2])
MODEL_FILE = bundle.merge_blobs([("block0", BLOB), ("head", BLOB2)], {"snakenode.job_id": JOB_ID})
PROFILE = {"t": "profile", "v": 1, "peer_id": PEERS[0], "seq": 1, "addrs": ["/ip4/127.0.0.1/tcp/1"],
           "role": "node", "version": "0.1.0", "network": "snake", "memory_mb": 1024, "jobs": [JOB_ID],
           "preparing": [], "lane_port": 4002, "compute": {"samples_per_s": 100.0, "workload": "mlp"},
           "data": {"dataset": "digits", "task": "classification", "samples": 100, "num_classes": 10,
                    "label_hist": [10] * 10, "fingerprint": "f"},
           "state": {"kind": "training", "job": JOB_ID, "hop": 1}}
PROPOSE = {"t": "propose", "job_id": JOB_ID, "job": SIGNED.encode(), "state": STATE1.to_dict(), "suggested": 2,
           "layers": {"block0": ENTRY.hash, "head": ENTRY2.hash}}
ACCEPT = {"t": "accept", "job_id": JOB_ID, "hop": 1, "attempt": 0, "size": 1, "held": [ENTRY.hash],
          "partial": {ENTRY2.hash: 8}}
DECLINE = {"t": "decline", "job_id": JOB_ID, "reason": "busy", "detail": "training"}
CLAIM = {"t": "lease", "job_id": JOB_ID, "hop": 1, "attempt": 0, "lineage": STATE1.lineage, "phase": "training"}
INCOMING = {"t": "bundle", "manifest": MANIFEST.encode(),
            "send": [{"name": "block0", "hash": ENTRY.hash, "offset": 0}]}
RECORD = hoplog.from_state("trained", STATE1, node=PEERS[1], t=10.0, trained={"stem": True, "head": False},
                           metrics_before={"accuracy": 0.4}, metrics_after={"accuracy": 0.5, "loss": 1.0},
                           t_recv=1.0, t_train_start=2.0, t_train_end=3.0, detail={"kd": {"on": True}})


def _check_samples() -> None:
    """The fixtures are valid: every mutation starts from something the decoder accepts."""
    profile.decode(PROFILE)
    Propose.from_wire(wire.Fields(PROPOSE, "m"))
    Accept.from_wire(wire.Fields(ACCEPT, "m"))
    Decline.from_wire(wire.Fields(DECLINE, "m"))
    ClaimRef.from_wire(wire.Fields(CLAIM, "m"))
    transfer.decode_incoming(wire.Fields(INCOMING, "m"))
    assert hoplog.validate_record(RECORD) == []
    verify_job(SignedJob.decode(SIGNED.encode()), {SUBMITTER.peer_id})
    bundle.verify_blob(BLOB, ENTRY)
    bundle.read_model_file(MODEL_FILE)


_check_samples()

# ---------------------------------------------------------------------------------------------- harness

def run_decoder(fn: Callable[..., Any], allowed: type[BaseException] | tuple[type[BaseException], ...],
                *args: Any, **kw: Any) -> tuple[bool, Any]:
    """Call a decoder; (True, value) when it decoded, (False, error) when it raised an allowed error.
    Any other exception propagates (the property fails); so does a slow or memory-hungry call.
    Allocations are traced during the call only (tracing everything would triple the run time)."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    t0 = time.monotonic()
    try:
        out: tuple[bool, Any] = (True, fn(*args, **kw))
    except allowed as exc:
        out = (False, exc)
    finally:
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        if not tracing:
            tracemalloc.stop()
    assert elapsed < MAX_SECONDS, f"{fn.__qualname__} took {elapsed:.1f} s on a small input"
    assert peak - base < MAX_ALLOC, f"{fn.__qualname__} allocated {(peak - base) / 2**20:.0f} MiB on a small input"
    return out


# ---------------------------------------------------------------------------------------------- strategies

NASTY = st.sampled_from([
    None, True, False, 0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**30, -(10**30),
    0.5, -0.0, math.nan, math.inf, -math.inf, 1e308, "", "x" * 300, "\x00", "\ud7ff", "12D3KooW",
    b"", b"\x00" * 64, [], [[]], {}, {"": None}, [None] * 50, {"t": "error"}, "ab" * 32, "AB" * 32,
]).map(copy.deepcopy)  # fresh containers: mutations must never change the shared samples
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.binary(max_size=40))


def values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Anything msgpack can carry (maps with string keys, as our decoders receive them)."""
    return st.recursive(SCALARS | NASTY, lambda kids: st.lists(kids, max_size=5)
                        | st.dictionaries(st.text(max_size=10), kids, max_size=5), max_leaves=max_leaves)


def _paths(obj: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if depth >= 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, (*prefix, i), depth + 1)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated(draw: st.DrawFn, valid: Any, n: int = 3) -> Any:
    """`valid` with one to `n` mutations at random places: replace, delete, add, or nudge a value."""
    obj = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, n))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "nasty", "delete", "add", "nudge"]))
        if not path:
            if op in ("replace", "nasty"):
                obj = draw(values() if op == "replace" else NASTY)
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = draw(values())
        elif op == "nasty":
            parent[key] = draw(NASTY)
        elif op == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif op == "add":
            target = _get(obj, path)
            if isinstance(target, dict):
                target[draw(st.text(max_size=10) | st.sampled_from(list(target) or ["t"]))] = draw(values())
            elif isinstance(target, list):
                target.append(draw(values()))
            else:
                parent[key] = [target, draw(values())]
        else:
            v = parent[key]
            if isinstance(v, bool):
                parent[key] = not v
            elif isinstance(v, int):
                parent[key] = v + draw(st.sampled_from([-1, 1, -(2**32), 2**63]))
            elif isinstance(v, float):
                parent[key] = draw(st.sampled_from([-v, v * 1e300, math.nan, v + 1]))
            elif isinstance(v, str) and v:
                i = draw(st.integers(0, len(v) - 1))
                parent[key] = v[:i] + draw(st.sampled_from(["Z", "0", "", "\x00", v[i] * 3])) + v[i + 1:]
            elif isinstance(v, bytes) and v:
                i = draw(st.integers(0, len(v) - 1))
                parent[key] = v[:i] + bytes([v[i] ^ 0xFF]) + v[i + 1:]
    return obj


@st.composite
def mutated_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with bytes flipped, cut, duplicated or inserted."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "set"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, max(1, len(data) // 2)))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
        else:
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0xC1, 0xDD, 0xDF, 0xC9, 0x7F, 0x80]))
    return bytes(data)


def _wire_ints(obj: Any) -> Any:
    """msgpack carries integers in [-2**63, 2**64): clamp the rest (the decoders never see them)."""
    if isinstance(obj, dict):
        return {k: _wire_ints(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_wire_ints(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool):
        return max(-(2**63), min(obj, 2**64 - 1))
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(_wire_ints(obj), use_bin_type=True)


def packed(obj_strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return obj_strategy.map(packb)


def bytes_from(valid_obj: Any) -> st.SearchStrategy[bytes]:
    """Bytes a decoder of `valid_obj`'s encoding may meet: random, mutated objects, mutated encodings."""
    enc = packb(valid_obj)
    return st.binary(max_size=256) | packed(values()) | packed(mutated(valid_obj)) | mutated_bytes(enc)


# Short inputs that claim huge sizes: each must be refused without allocating what it claims.
AMPLIFIERS = [
    b"\xdd\xff\xff\xff\xff",                      # array32 of 4 billion items
    b"\xdf\xff\xff\xff\xff",                      # map32 of 4 billion pairs
    b"\xc6\xff\xff\xff\xff",                      # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",                      # str32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",                  # ext32 of 4 GiB
    b"\x91" * 100_000 + b"\xc0",                  # arrays nested 100k deep
    b"\xdd\x00\x01\x86\xa0" + b"\xdc\x00\x00" * 100_000,  # 100k empty arrays in 300 kB
]

# ---------------------------------------------------------------------------------------------- wire


def _plain(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, bool | int | float | str | bytes)


@FUZZ
@given(data=bytes_from(PROPOSE) | bytes_from(PROFILE) | st.sampled_from(AMPLIFIERS))
def test_wire_unpackb(data: bytes) -> None:
    ok, out = run_decoder(wire.unpackb, wire.WireError, data)
    if ok:
        assert _plain(out), "only plain maps, lists, strings, bytes and numbers may come out"
    else:
        assert out.kind in ("malformed", "oversize")


@FUZZ
@given(data=bytes_from(PROPOSE) | bytes_from(ACCEPT) | st.sampled_from(AMPLIFIERS),
       limit=st.sampled_from([64, 4096, wire.MAX_FRAME]))
def test_wire_decode_message(data: bytes, limit: int) -> None:
    ok, out = run_decoder(wire.decode_message, wire.WireError, data, limit)
    if ok:
        kind, fields = out
        assert isinstance(kind, str) and len(kind) <= 32 and isinstance(fields, wire.Fields)
    elif len(data) > limit:
        assert out.kind == "oversize"


def _fields_calls(f: wire.Fields, key: str) -> list[tuple[Callable[[], Any], Callable[[Any], bool]]]:
    return [
        (lambda: f.str(key, 8), lambda v: isinstance(v, str) and len(v) <= 8),
        (lambda: f.str(key, 64, pattern=wire.HEX64_RE), lambda v: isinstance(v, str)),
        (lambda: f.bytes(key, 16), lambda v: isinstance(v, bytes) and len(v) <= 16),
        (lambda: f.int(key, -5, 5), lambda v: type(v) is int and -5 <= v <= 5),
        (lambda: f.float(key, 0, 1), lambda v: type(v) is float and 0 <= v <= 1),
        (lambda: f.bool(key), lambda v: type(v) is bool),
        (lambda: f.choice(key, ("a", "b")), lambda v: v in ("a", "b")),
        (lambda: f.str_list(key, 3, 4), lambda v: isinstance(v, list) and len(v) <= 3),
        (lambda: f.int_list(key, 3, 0, 9), lambda v: isinstance(v, list) and all(0 <= i <= 9 for i in v)),
        (lambda: f.map(key), lambda v: isinstance(v, wire.Fields)),
        (lambda: f.str(key, 8, required=False), lambda v: isinstance(v, str)),
        (lambda: f.int(key, required=False), lambda v: type(v) is int),
    ]


@FUZZ
@given(obj=values(30) | mutated(PROFILE), key=st.sampled_from(["t", "v", "peer_id", "addrs", "x", ""]))
def test_wire_fields_accessors(obj: Any, key: str) -> None:
    ok, f = run_decoder(wire.Fields, wire.WireError, obj, "m")
    if not ok:
        return
    for call, well_typed in _fields_calls(f, key):
        ok, v = run_decoder(call, wire.WireError)
        if ok:
            assert well_typed(v), (key, v)
        else:
            assert key in str(v) and v.kind == "malformed"


# ---------------------------------------------------------------------------------------------- profiles


@FUZZ
@given(obj=mutated(PROFILE) | values())
def test_profile_decode(obj: Any) -> None:
    ok, out = run_decoder(profile.decode, wire.WireError, obj)
    if ok:
        assert wire.PEER_ID_RE.match(out["peer_id"]) and out["role"] in profile.ROLES


# ---------------------------------------------------------------------------------------------- messages


@FUZZ
@given(obj=mutated(PROPOSE))
def test_propose_from_wire(obj: Any) -> None:
    ok, f = run_decoder(wire.Fields, wire.WireError, obj, "propose")
    if ok:
        ok, p = run_decoder(Propose.from_wire, wire.WireError, f)
        if ok:
            assert p.state.job_id == p.job_id and len(p.job) <= 64 * 1024


@FUZZ
@given(obj=mutated(ACCEPT) | mutated(DECLINE) | mutated(CLAIM) | values(),
       cls=st.sampled_from([Accept, Decline, ClaimRef]))
def test_accept_decline_claimref_from_wire(obj: Any, cls: Any) -> None:
    ok, f = run_decoder(wire.Fields, wire.WireError, obj, "m")
    if ok:
        run_decoder(cls.from_wire, wire.WireError, f)


# ---------------------------------------------------------------------------------------------- job_state


@FUZZ
@given(obj=mutated(STATE1.to_dict()) | mutated(STATE0.to_dict()) | values())
@example(obj={**STATE1.to_dict(), "holder": []})
def test_job_state_from_dict(obj: Any) -> None:
    ok, s = run_decoder(state_mod.JobState.from_dict, state_mod.StateError, obj)
    if ok:
        assert state_mod.JobState.from_dict(s.to_dict()) == s


@FUZZ
@given(value=values() | st.sampled_from(PEERS))
@example(value=[])
def test_is_peer_id_never_raises(value: Any) -> None:
    ok, out = run_decoder(state_mod.is_peer_id, (), value)
    assert isinstance(out, bool)


@FEW
@given(obj=values() | mutated(STATE1.to_dict()["window"]) | mutated(RECORD["window"]))
def test_window_decoders(obj: Any) -> None:
    run_decoder(Window.from_dict, WindowError, obj)
    run_decoder(Window.from_log, WindowError, obj)


# ---------------------------------------------------------------------------------------------- jobs


@FUZZ
@given(data=bytes_from(SIGNED.to_dict()) | st.sampled_from(AMPLIFIERS))
def test_signed_job_decode(data: bytes) -> None:
    ok, out = run_decoder(SignedJob.decode, JobRejected, data)
    if not ok:
        assert out.reason == "malformed"


def _resign(spec: Any, created: float = 1.0) -> SignedJob:
    """A job whose signature verifies, over whatever spec: only the spec check stands in the way."""
    spec = _wire_ints(spec)  # specs arrive through msgpack
    unsigned = SignedJob(spec, SUBMITTER.peer_id, created, "0" * 32, b"")
    try:
        payload = unsigned.payload()
    except TypeError:
        return unsigned
    return SignedJob(spec, SUBMITTER.peer_id, created, "0" * 32, SUBMITTER.sign(SIGN_DOMAIN + payload))


@FUZZ
@given(spec=mutated(SIGNED.spec) | mutated(JOB_SPEC) | values(), resign=st.booleans())
def test_verify_job(spec: Any, resign: bool) -> None:
    """A spec that passes the signature check is still only accepted in complete, valid, normalised form."""
    signed = _resign(spec) if resign else SignedJob(_wire_ints(spec), SUBMITTER.peer_id, 1.0, "0" * 32, b"\x00" * 64)
    ok, out = run_decoder(verify_job, JobRejected, signed, {SUBMITTER.peer_id})
    if ok:
        assert validate_spec(signed.spec) == signed.spec
    else:
        assert out.reason in ("invalid_spec", "bad_signature")


@FEW
@given(d=mutated(SIGNED.to_dict()))
def test_signed_job_from_wire_then_verify(d: Any) -> None:
    ok, signed = run_decoder(SignedJob.decode, JobRejected, packb(d))
    if ok:
        run_decoder(verify_job, JobRejected, signed, {SUBMITTER.peer_id, PEERS[0]})


# ---------------------------------------------------------------------------------------------- bundles


def _header_doc_blob(doc: Any, data_len: int = 0) -> bytes:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc, default=lambda o: o.hex()).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\x00" * data_len


def _blob_variants() -> st.SearchStrategy[bytes]:
    header = json.loads(BLOB[8:8 + struct.unpack("<Q", BLOB[:8])[0]])
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                               | st.text(max_size=10), lambda k: st.lists(k, max_size=4)
                               | st.dictionaries(st.text(max_size=8), k, max_size=4), max_leaves=15)
    return (st.binary(max_size=200) | mutated_bytes(BLOB) | mutated_bytes(BLOB2)
            | st.builds(_header_doc_blob, mutated(header), st.integers(0, 64))
            | st.builds(_header_doc_blob, json_values, st.integers(0, 16)))


DEEP_JSON = _header_doc_blob(b"[" * 5000 + b"]" * 5000)
UNHASHABLE_DTYPE = _header_doc_blob({"w": {"dtype": [], "shape": [], "data_offsets": [0, 0]}})

# DEEP_JSON and UNHASHABLE_DTYPE once escaped the bundle decoders as RecursionError and TypeError.


@FUZZ
@given(blob=_blob_variants())
@example(blob=DEEP_JSON)
@example(blob=UNHASHABLE_DTYPE)
def test_bundle_parse_header(blob: bytes) -> None:
    ok, h = run_decoder(bundle.parse_header, bundle.BundleError, blob)
    if ok:
        assert h.data_start + h.data_len == len(blob)
    else:
        assert h.code in bundle.ERROR_CODES


@FUZZ
@given(blob=_blob_variants(), entry=st.sampled_from([ENTRY, ENTRY2]))
@example(blob=UNHASHABLE_DTYPE, entry=ENTRY)
def test_bundle_verify_blob(blob: bytes, entry: bundle.LayerEntry) -> None:
    ok, _ = run_decoder(bundle.verify_blob, bundle.BundleError, blob, entry)
    if ok:
        assert blob == (BLOB if entry is ENTRY else BLOB2), "only the exact blob may pass (hash check)"


MANIFEST_DOC = msgpack.unpackb(MANIFEST.encode(), raw=False)
UNHASHABLE_MANIFEST = msgpack.packb({**MANIFEST_DOC, "layers": [
    {**MANIFEST_DOC["layers"][0], "tensors": {"w": {"dtype": [], "shape": [3, 4]}}}]}, use_bin_type=True)


@FUZZ
@given(data=bytes_from(MANIFEST_DOC) | st.sampled_from(AMPLIFIERS))
@example(data=UNHASHABLE_MANIFEST)
def test_layer_bundle_decode(data: bytes) -> None:
    ok, m = run_decoder(bundle.LayerBundle.decode, bundle.BundleError, data)
    if ok:
        run_decoder(m.check_against, bundle.BundleError, {"block0": ENTRY, "head": ENTRY2})


@FUZZ
@given(data=mutated_bytes(MODEL_FILE) | _blob_variants())
@example(data=DEEP_JSON)
def test_read_model_file(data: bytes) -> None:
    ok, out = run_decoder(bundle.read_model_file, bundle.BundleError, data)
    if ok:
        blobs, _meta = out
        for b in blobs.values():
            bundle.parse_header(b)


@FUZZ
@given(obj=mutated(INCOMING) | st.builds(lambda m: {**INCOMING, "manifest": m},
                                         mutated_bytes(INCOMING["manifest"])))
@example(obj={**INCOMING, "manifest": UNHASHABLE_MANIFEST})
def test_transfer_decode_incoming(obj: Any) -> None:
    ok, f = run_decoder(wire.Fields, wire.WireError, obj, "bundle")
    if ok:
        ok, inc = run_decoder(transfer.decode_incoming, (transfer.TransferError, wire.WireError), f)
        if ok:
            names = {e.name for e in inc.manifest.layers}
            assert all(it.entry.name in names and 0 <= it.offset <= it.entry.size for it in inc.send)


# ---------------------------------------------------------------------------------------------- lane offers

LANE_CERT = lane.LaneCert.generate()
OFFER = lane.LaneOffer(4003, "lane-" + "ab" * 16, b"\x07" * 32, LANE_CERT.der).to_wire()


@FEW
@given(der=mutated_bytes(LANE_CERT.der) | st.binary(max_size=300) | values())
def test_lane_check_cert(der: Any) -> None:
    run_decoder(lane.check_cert, wire.WireError, der, "propose.lane.cert")
    run_decoder(lane.decode_propose_field, wire.WireError, wire.Fields({"v": 1, "cert": der}, "propose.lane"))


@FEW
@given(obj=mutated(OFFER))
def test_lane_offer_from_wire(obj: Any) -> None:
    ok, f = run_decoder(wire.Fields, wire.WireError, obj, "accept.lane")
    if ok:
        ok, offer = run_decoder(lane.LaneOffer.from_wire, wire.WireError, f)
        if ok:
            assert 1 <= offer.port <= 65535 and len(offer.token) == 32


# ---------------------------------------------------------------------------------------------- hop log


@FUZZ
@given(rec=mutated(RECORD) | values())
@example(rec={**RECORD, "event": []})
@example(rec={**RECORD, "node": {}})
def test_hoplog_validate_record(rec: Any) -> None:
    ok, problems = run_decoder(hoplog.validate_record, (), rec)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)


# ---------------------------------------------------------------------------------------------- fault specs

_FAULT_TOKENS = st.sampled_from([*faults.ACTIONS, *faults.PHASES, *faults.INT_KEYS, "job", "rate", "@", ":", "=",
                                 ",", ";", "&", "/s", "MB", "Mbit", "KiB", "1", "0", "-1", "1.5", "1e9",
                                 "9" * 30, " ", "x", "\u0661"])


@FEW
@given(spec=st.lists(_FAULT_TOKENS, max_size=12).map("".join) | st.text(max_size=60))
@example(spec="rate=" + "9" * 400 + "MB/s")
@example(spec="exit@recv:after_bytes=" + "1" * 5000)
def test_faults_parse(spec: str) -> None:
    ok, out = run_decoder(faults.parse, faults.FaultSpecError, spec)
    if ok:
        items, rate = out
        assert all(f.action in faults.ACTIONS and f.phase in faults.PHASES for f in items)
        assert rate is None or rate >= 0


# ---------------------------------------------------------------------------------------------- config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int | str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


TOML_SCALARS = (st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
                | st.sampled_from(["/ip4/127.0.0.1/tcp/0", "12D3KooW", "digits", "dirichlet:0.3", "1/2", "nan"]))
SETTING_NAMES = st.sampled_from([s.name for s in config.SETTINGS] + ["netwrok", "", "x.y"])
CONFIG_DOC = st.dictionaries(SETTING_NAMES, TOML_SCALARS | st.lists(TOML_SCALARS, max_size=3), max_size=4)
_HOME = Path(tempfile.mkdtemp(prefix="snakenode-fuzz-config-"))


def _write_toml(doc: dict[str, Any] | str) -> None:
    text = doc if isinstance(doc, str) else "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in doc.items())
    (_HOME / config.CONFIG_FILE).write_text(text, encoding="utf-8", errors="surrogatepass")


def _finite_numbers(cfg: config.NodeConfig) -> bool:
    return all(math.isfinite(getattr(cfg, s.name)) for s in config.SETTINGS if s.kind is float)


@FUZZ
@given(doc=CONFIG_DOC | st.text(max_size=80),
       env=st.dictionaries(st.sampled_from([config.ENV_PREFIX + s.name.upper() for s in config.SETTINGS]),
                           st.text(max_size=20) | st.sampled_from(["nan", "inf", "-1", "0", "1e999"]),
                           max_size=2))
@example(doc={"ping_interval_s": math.nan}, env={})
@example(doc={}, env={"SNAKENODE_PROFILE_TTL_S": "nan"})
def test_config_load(doc: dict[str, Any] | str, env: dict[str, str]) -> None:
    try:
        _write_toml(doc)
    except UnicodeEncodeError:
        return
    ok, cfg = run_decoder(config.load, config.ConfigError, _HOME, {}, env)
    if ok:
        assert _finite_numbers(cfg), "an accepted config holds only finite numbers"
        for s in config.SETTINGS:
            v = getattr(cfg, s.name)
            assert s.minimum is None or v >= s.minimum, s.name
            assert s.maximum is None or v <= s.maximum, s.name
            assert s.choices is None or v in s.choices, s.name


# ---------------------------------------------------------------------------------------------- amplification


@pytest.mark.parametrize("data", AMPLIFIERS, ids=lambda d: d[:6].hex())
def test_size_claims_cost_nothing(data: bytes) -> None:
    """Inputs that claim gigabytes are refused by every msgpack decoder without allocating them.

    One exception is legitimate: 100k empty arrays really are 300 kB of valid msgpack, so `wire.unpackb` at its
    default (frame) limit decodes them, in bounded time and memory (run_decoder checks both); every smaller
    limit refuses them as oversize."""
    honest = data.startswith(b"\xdd\x00\x01\x86\xa0")
    ok, out = run_decoder(wire.unpackb, wire.WireError, data)
    if honest:
        assert ok and out == [[]] * 100_000
    else:
        assert not ok and out.kind == "malformed", out
    ok, out = run_decoder(wire.unpackb, wire.WireError, data, wire.GOSSIP_MAX)
    assert not ok and out.kind == ("malformed" if len(data) <= wire.GOSSIP_MAX else "oversize"), out
    ok, out = run_decoder(SignedJob.decode, JobRejected, data)
    assert not ok and str(out).startswith("malformed"), out
    ok, out = run_decoder(bundle.LayerBundle.decode, bundle.BundleError, data)
    assert not ok and "not valid msgpack" in str(out), out


def test_blob_claims_cost_nothing() -> None:
    """A blob whose header claims a huge tensor, or a 16 MiB header it lacks, is refused cheaply."""
    huge = {"w": {"dtype": "F32", "shape": [2**39, 2**39], "data_offsets": [0, 2**80]}}
    for blob in (_header_doc_blob(huge), struct.pack("<Q", bundle.MAX_HEADER_BYTES) + b"{}",
                 struct.pack("<Q", 2**63) + b"{}"):
        ok, exc = run_decoder(bundle.parse_header, bundle.BundleError, blob)
        assert not ok and exc.code in ("bad_header", "truncated")
