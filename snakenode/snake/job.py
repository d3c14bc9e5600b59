"""Job specs: schema and defaults, strict validation, canonical encoding, signatures and job ids.

A job is code-like input from a stranger, so everything here is strict: unknown keys and bad values are
refused with the dotted key, the allowed values and what was given. A validated spec is *complete* (every
default filled in), and that complete form is what gets signed: nodes running different versions then
agree on every setting, and a node refuses a signed spec that is not in complete, normalised form.

Canonical encoding: msgpack (`use_bin_type`), maps with keys sorted recursively, floats as float64;
the same spec always gives the same bytes. A `SignedJob` signs
`SIGN_DOMAIN || canonical({created, nonce, spec, submitter})` with the submitter's Ed25519 key, and
`job_id` is the first 16 hex characters of sha256 of that canonical payload (without the domain tag).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import time
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import msgpack

from snakenode.identity import Identity, public_key_from_peer_id, verify

SIGN_DOMAIN = b"snakenode/job/1\n"   # signatures over job payloads can never pass for another message
WIRE_VERSION = 1
MAX_JOB_BYTES = 64 * 1024            # a spec is a few hundred bytes; room for large model_args
MAX_ARGS_DEPTH = 4
MAX_ARGS_ITEMS = 1024
MAX_ARG_STR = 4096
# Mirrors snakenode.train.data.DATASET_NAMES (a test keeps them equal); not imported so `submit` stays
# light. Names that take a path locally may appear bare in a job (any local path matches) or with one.
DATASET_NAMES = ("digits", "mnist5k", "cifar10", "digits32", "mnist32", "text", "synthetic")
_DATASET_PATH = {"cifar10", "text"}
LM_DATASETS = {"text"}
REJECT_REASONS = ("malformed", "untrusted_submitter", "bad_signature", "invalid_spec")

_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_NAME = re.compile(r"[\w .:+/@-]{1,80}\Z")
_ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
_NONCE = re.compile(r"[0-9a-f]{32}\Z")


class JobSpecError(ValueError):
    """A job spec value that breaks the schema; `key` is the dotted key (e.g. "train.lr")."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class JobRejected(Exception):
    """A signed job a node refuses; `reason` is one of REJECT_REASONS (counted, sent back, logged)."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class _Field:
    kind: str                                 # int | float | bool | enum | str
    default: Any
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False                     # lo itself not allowed
    hi_open: bool = False
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            return f"{noun} in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"
        return "a string"

    def check(self, key: str, value: Any) -> Any:
        bad = JobSpecError(key, f"must be {self.allowed()}, got {value!r:.80}")
        if self.kind == "bool":
            if type(value) is not bool:
                raise bad
            return value
        if self.kind == "enum":
            if not isinstance(value, str) or value not in self.choices:
                raise bad
            return value
        if self.kind == "int":
            if type(value) is not int:
                raise bad
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad
            value = float(value)
        assert self.lo is not None and self.hi is not None
        if value < self.lo or value > self.hi or (self.lo_open and value == self.lo) \
                or (self.hi_open and value == self.hi):
            raise bad
        return value


def _fmt(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _int(default: int, lo: int, hi: int) -> _Field:
    return _Field("int", default, lo, hi)


def _float(default: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> _Field:
    return _Field("float", default, lo, hi, lo_open, hi_open)


def _enum(default: str, *choices: str) -> _Field:
    return _Field("enum", default, choices=choices)


def _bool(default: bool) -> _Field:
    return _Field("bool", default)


TABLES: dict[str, dict[str, _Field]] = {
    "train": {
        "epochs": _int(1, 1, 10_000),
        "batch": _int(32, 1, 65_536),
        "lr": _float(0.05, 0.0, 10.0, lo_open=True),
        "optimizer": _enum("sgd", "sgd", "adam", "adamw"),
        "momentum": _float(0.9, 0.0, 1.0, hi_open=True),
        "weight_decay": _float(0.0, 0.0, 1.0),
        "micro_batch": _int(0, 0, 65_536),           # 0 = batch
        "max_steps": _int(0, 0, 1_000_000_000),      # 0 = no cap
        "frozen_dtype": _enum("fp32", "fp32", "bf16", "int8"),
        "checkpoint_frozen": _bool(False),
        "seq_len": _int(128, 8, 65_536),
    },
    "kd": {
        "mode": _enum("auto", "on", "off", "auto"),
        "alpha": _float(0.5, 0.0, 1.0),
        "T": _float(2.0, 0.0, 100.0, lo_open=True),
        "reference": _enum("uniform", "uniform", "union"),
        "auto_threshold": _float(0.1, 0.0, 1.0),     # Jensen-Shannon divergence in nats (max ln 2)
        "balance": _enum("softmax", "none", "softmax"),  # CE with the node's log label prior added (logit adjustment)
    },
    "window": {
        "min_blocks": _int(1, 1, 100_000),
        "max_blocks": _int(2, 1, 100_000),
        "hop_time_s": _float(120.0, 0.0, 86_400.0, lo_open=True),
        "train_stem": _bool(True),
        "train_head": _bool(True),
    },
    "lap": {
        "drop_after_s": _float(30.0, 0.0, 86_400.0, lo_open=True),
        "max_declines": _int(3, 1, 1000),
    },
    "guard": {
        # Poisoning guard on incoming models: a layer whose norm of change relative to the version this
        # node last held exceeds max_rel_change is refused; from the second lap on, an incoming model whose
        # local validation loss exceeds val_loss_factor x that of the previous incoming model is refused.
        "enabled": _bool(True),
        "max_rel_change": _float(10.0, 0.0, 1e6, lo_open=True),
        "val_loss_factor": _float(4.0, 2.0, 1e6),
    },
    "routing": {
        "novelty": _float(1.0, 0.0, 100.0),
        "compute": _float(0.3, 0.0, 100.0),
        "link": _float(0.2, 0.0, 100.0),
        "recent_hops": _int(3, 1, 64),
    },
}

TOP: dict[str, _Field] = {
    "mode": _enum("p2p", "p2p", "cs"),
    "fallback": _enum("none", "none", "p2p"),
    "laps": _int(1, 1, 100_000),
    "target_metric": _float(0.0, 0.0, 1e9),         # 0 = none; accuracy (<= 1) or perplexity
    "seed": _int(0, 0, 2**32 - 1),
    "transfer_dtype": _enum("fp32", "fp32", "bf16"),
}
# Checked by hand below: name, model, model_args, dataset, coordinator.
TOP_KEYS = ("name", "model", "model_args", "dataset", "mode", "coordinator", "fallback", "laps",
            "target_metric", "seed", "transfer_dtype", *TABLES)


def _unknown(key: str, known: list[str]) -> JobSpecError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return JobSpecError(key, f"unknown key{hint} (allowed: {', '.join(known)})")


def _check_dataset(value: Any) -> str:
    if not isinstance(value, str):
        raise JobSpecError("dataset", f"must be a string such as 'digits' or 'text:pydoc', got {value!r:.80}")
    name, sep, path = value.partition(":")
    allowed = ", ".join(n + ("[:PATH]" if n in _DATASET_PATH else "") for n in DATASET_NAMES)
    if name not in DATASET_NAMES:
        raise JobSpecError("dataset", f"unknown dataset {value!r:.80}; allowed: {allowed}")
    if sep and (name not in _DATASET_PATH or not path or len(path) > 256 or any(c.isspace() for c in path)):
        raise JobSpecError("dataset", f"{value!r:.80} is not a valid data task; allowed: {allowed}")
    return value


def _check_args(key: str, value: Any, depth: int = 0) -> Any:
    """model_args: a free table for the model registry, limited to plain, bounded values."""
    if isinstance(value, bool | str):
        if isinstance(value, str) and len(value) > MAX_ARG_STR:
            raise JobSpecError(key, f"strings are limited to {MAX_ARG_STR} characters")
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise JobSpecError(key, "integers must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise JobSpecError(key, "numbers must be finite")
        return value
    if depth >= MAX_ARGS_DEPTH:
        raise JobSpecError(key, f"model_args nest at most {MAX_ARGS_DEPTH} levels deep")
    if isinstance(value, list | tuple):
        if len(value) > MAX_ARGS_ITEMS:
            raise JobSpecError(key, f"lists hold at most {MAX_ARGS_ITEMS} items")
        return [_check_args(f"{key}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if len(value) > MAX_ARGS_ITEMS:
            raise JobSpecError(key, f"tables hold at most {MAX_ARGS_ITEMS} keys")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not _ARG_KEY.match(k):
                raise JobSpecError(f"{key}.{k}", "keys must be identifiers (letters, digits, _ . -)")
            out[k] = _check_args(f"{key}.{k}", v, depth + 1)
        return out
    raise JobSpecError(key, f"must be a string, number, boolean, list or table, got {type(value).__name__}")


def validate_spec(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, normalised copy of `raw` (defaults filled in, ints promoted where numbers are
    expected), or JobSpecError naming the first bad key."""
    if not isinstance(raw, Mapping):
        raise JobSpecError("(job)", "a job spec must be a table of keys")
    for key in raw:
        if not isinstance(key, str) or key not in TOP_KEYS:
            raise _unknown(key if isinstance(key, str) and key else repr(key), list(TOP_KEYS))
    spec: dict[str, Any] = {}
    model = raw.get("model")
    if model is None:
        raise JobSpecError("model", "required: the model's registry name, e.g. model = \"mlp\"")
    if not isinstance(model, str) or not _MODEL.match(model):
        raise JobSpecError("model", f"must be a model name (letters, digits, . _ -), got {model!r:.80}")
    if "dataset" not in raw:
        raise JobSpecError("dataset", "required: the data task nodes join with, e.g. dataset = \"digits\"")
    dataset = _check_dataset(raw["dataset"])
    name = raw.get("name", f"{model}-{dataset}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise JobSpecError("name", f"must be 1..80 letters, digits, spaces or . : + / @ - _, got {name!r:.80}")
    spec["name"] = name
    spec["model"] = model
    args = raw.get("model_args", {})
    if not isinstance(args, Mapping):
        raise JobSpecError("model_args", "must be a table, e.g. [model_args] hidden = 64")
    spec["model_args"] = _check_args("model_args", args)
    spec["dataset"] = dataset
    for key, fld in TOP.items():
        spec[key] = fld.check(key, raw.get(key, fld.default))
    coordinator = raw.get("coordinator", "")
    if not isinstance(coordinator, str):
        raise JobSpecError("coordinator", f"must be a peer id string, got {coordinator!r:.80}")
    if coordinator:
        try:
            public_key_from_peer_id(coordinator)
        except ValueError:
            raise JobSpecError("coordinator", f"{coordinator!r:.80} is not an Ed25519 peer id "
                               "(see `snakenode id --home DIR` on the coordinator)") from None
    spec["coordinator"] = coordinator
    for table, fields in TABLES.items():
        given = raw.get(table, {})
        if not isinstance(given, Mapping):
            raise JobSpecError(table, f"must be a table ([{table}])")
        for key in given:
            if key not in fields:
                raise _unknown(f"{table}.{key if isinstance(key, str) and key else repr(key)}", list(fields))
        spec[table] = {k: f.check(f"{table}.{k}", given.get(k, f.default)) for k, f in fields.items()}
    _cross_checks(spec)
    return spec


def _cross_checks(spec: dict[str, Any]) -> None:
    w, t = spec["window"], spec["train"]
    if w["max_blocks"] < w["min_blocks"]:
        raise JobSpecError("window.max_blocks", f"must be >= window.min_blocks ({w['min_blocks']}), "
                           f"got {w['max_blocks']}")
    if t["micro_batch"] > t["batch"]:
        raise JobSpecError("train.micro_batch", f"must be <= train.batch ({t['batch']}) or 0 (= batch), "
                           f"got {t['micro_batch']}")
    if spec["mode"] == "cs" and not spec["coordinator"]:
        raise JobSpecError("coordinator", "required when mode = \"cs\": the coordinator's peer id "
                           "(`snakenode id --home DIR` on the coordinator)")
    if task(spec) == "classification" and spec["target_metric"] > 1:
        raise JobSpecError("target_metric", f"is a test accuracy for {spec['dataset']} jobs: must be in "
                           f"[0, 1] (0 = none), got {spec['target_metric']:g}")


def parse_spec(text: str, source: str = "job") -> dict[str, Any]:
    """Parse TOML job text and validate it (JobSpecError names the source on TOML syntax errors)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError("(toml)", f"{source} is not valid TOML: {exc}") from None
    return validate_spec(raw)


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and validate a job file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobSpecError("(file)", f"cannot read job file {path}: {exc.strerror or exc}") from None
    return parse_spec(text, str(path))


def demo_spec_text() -> str:
    """The demo's default job (package data snakenode/jobs/demo.toml)."""
    return resources.files("snakenode").joinpath("jobs/demo.toml").read_text(encoding="utf-8")


def with_mode(spec: Mapping[str, Any], mode: str, coordinator: str | None = None) -> dict[str, Any]:
    """`submit --mode` (and `--coordinator`): the spec with its mode overridden, validated again."""
    raw = {**spec, "mode": mode}
    if coordinator is not None:
        raw["coordinator"] = coordinator
    return validate_spec(raw)


# ---------------------------------------------------------------------------------------------- meaning


def task(spec: Mapping[str, Any]) -> str:
    """"lm" for text data tasks, else "classification"."""
    return "lm" if str(spec["dataset"]).partition(":")[0] in LM_DATASETS else "classification"


def metric_name(spec: Mapping[str, Any]) -> str:
    """The validation metric the target and lap means refer to: accuracy, or perplexity for LMs."""
    return "perplexity" if task(spec) == "lm" else "accuracy"


def target_reached(spec: Mapping[str, Any], value: float) -> bool:
    """Has a metric value reached the job's target? (accuracy >= target, perplexity <= target)."""
    target = float(spec.get("target_metric") or 0.0)
    if target <= 0:
        return False
    return value <= target if task(spec) == "lm" else value >= target


def dataset_matches(job_dataset: str, data_flag: str) -> bool:
    """Does a node started with `--data data_flag` fit a job's `dataset`? A bare job dataset matches any
    path (`cifar10` matches `cifar10:/data/c10`); one with a path matches only that path."""
    if ":" in job_dataset:
        return data_flag == job_dataset
    return data_flag.partition(":")[0] == job_dataset


# ---------------------------------------------------------------------------------------------- encoding


def _sorted(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("canonical encoding needs string keys")
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} canonically")


def canonical(obj: Any) -> bytes:
    """Deterministic msgpack: maps sorted by key at every level, floats as float64."""
    return msgpack.packb(_sorted(obj), use_bin_type=True)


@dataclass(frozen=True)
class SignedJob:
    """A job as it travels: the complete spec, who submitted it, when, a nonce (so resubmitting the same
    spec makes a new job) and the submitter's Ed25519 signature."""

    spec: dict[str, Any]
    submitter: str
    created: float
    nonce: str
    sig: bytes

    def payload(self) -> bytes:
        return canonical({"created": self.created, "nonce": self.nonce, "spec": self.spec,
                          "submitter": self.submitter})

    @property
    def job_id(self) -> str:
        return hashlib.sha256(self.payload()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "spec": self.spec, "submitter": self.submitter, "created": self.created,
                "nonce": self.nonce, "sig": self.sig}

    @classmethod
    def from_dict(cls, d: Any) -> SignedJob:
        """Strict structural decoding (types and sizes); trust, signature and spec are `verify_job`'s."""
        keys = {"v", "spec", "submitter", "created", "nonce", "sig"}
        if not isinstance(d, Mapping) or set(d) != keys:
            got = sorted(map(str, d)) if isinstance(d, Mapping) else type(d).__name__
            raise JobRejected("malformed", f"a signed job is a map with keys {sorted(keys)}, got {got}")
        if d["v"] != WIRE_VERSION or type(d["v"]) is not int:
            raise JobRejected("malformed", f"signed job version {d['v']!r:.20} is not supported "
                              f"(this node speaks {WIRE_VERSION}): upgrade the older side")
        if not isinstance(d["spec"], dict):
            raise JobRejected("malformed", "spec must be a map")
        if not isinstance(d["submitter"], str) or not 1 <= len(d["submitter"]) <= 128:
            raise JobRejected("malformed", "submitter must be a peer id string")
        created = d["created"]
        if type(created) is not float or not math.isfinite(created) or created < 0:
            raise JobRejected("malformed", f"created must be a float unix time, got {created!r:.40}")
        if not isinstance(d["nonce"], str) or not _NONCE.match(d["nonce"]):
            raise JobRejected("malformed", "nonce must be 32 lowercase hex characters")
        if not isinstance(d["sig"], bytes) or len(d["sig"]) != 64:
            raise JobRejected("malformed", "sig must be 64 bytes (Ed25519)")
        return cls(d["spec"], d["submitter"], created, d["nonce"], d["sig"])

    def encode(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = MAX_JOB_BYTES) -> SignedJob:
        """Decode wire bytes; JobRejected("malformed") on anything unexpected, never another exception."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) > max_bytes:
            raise JobRejected("malformed", f"a signed job is at most {max_bytes} bytes")
        try:
            obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True,
                                  max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=MAX_ARGS_ITEMS,
                                  max_map_len=MAX_ARGS_ITEMS, max_ext_len=0)
        except Exception as exc:  # msgpack raises many types on garbage (ValueError, ExtraData, ...)
            raise JobRejected("malformed", f"not a msgpack signed job ({type(exc).__name__})") from None
        return cls.from_dict(obj)


def sign_job(spec: Mapping[str, Any], identity: Identity, *, created: float | None = None,
             nonce: str | None = None) -> SignedJob:
    """Validate `spec`, complete it with defaults and sign it as `identity`."""
    full = validate_spec(spec)
    created = time.time() if created is None else float(created)
    nonce = os.urandom(16).hex() if nonce is None else nonce
    unsigned = SignedJob(full, identity.peer_id, created, nonce, b"")
    return SignedJob(full, identity.peer_id, created, nonce, identity.sign(SIGN_DOMAIN + unsigned.payload()))


def verify_job(signed: SignedJob, trusted: Collection[str]) -> None:
    """Accept a signed job or raise JobRejected: untrusted_submitter (not in trusted_submitters),
    bad_signature, or invalid_spec (breaks this node's schema, or not in complete normalised form)."""
    if signed.submitter not in trusted:
        raise JobRejected("untrusted_submitter", f"{signed.submitter} is not in trusted_submitters; "
                          f"if you trust it run `snakenode trust add {signed.submitter}`")
    try:
        payload = signed.payload()
    except TypeError as exc:
        raise JobRejected("invalid_spec", f"spec cannot be encoded: {exc}") from None
    if not verify(signed.submitter, SIGN_DOMAIN + payload, signed.sig):
        raise JobRejected("bad_signature", f"the signature does not match submitter {signed.submitter}")
    try:
        normalised = validate_spec(signed.spec)
    except JobSpecError as exc:
        raise JobRejected("invalid_spec", str(exc)) from None
    if canonical(normalised) != canonical(signed.spec):
        raise JobRejected("invalid_spec", "spec is not in complete normalised form (sign it with "
                          "`snakenode submit`, which fills in every default)")
