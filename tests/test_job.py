"""Job specs: schema, defaults, strict validation, canonical encoding, signatures, wire codec."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from snakenode.identity import Identity
from snakenode.snake import job
from snakenode.snake.job import JobRejected, JobSpecError, SignedJob, sign_job, validate_spec, verify_job
from snakenode.train import data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "jobs").glob("*.toml"))
ALICE = Identity(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
MALLORY = Identity(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32))
MINIMAL = {"model": "mlp", "dataset": "digits"}


def spec(**over: object) -> dict:
    return validate_spec({**MINIMAL, **over})


def err(raw: dict) -> JobSpecError:
    with pytest.raises(JobSpecError) as info:
        validate_spec(raw)
    return info.value


# ---------------------------------------------------------------------------------------------- examples


def test_example_jobs_validate() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"digits-noniid.toml", "llm-tiny.toml", "vgg11-digits32.toml"} <= names
    for path in EXAMPLES:
        s = job.load_spec(path)
        assert s == validate_spec(s)                         # complete and normalised
    digits = job.load_spec(ROOT / "jobs/digits-noniid.toml")
    assert (digits["model"], digits["dataset"], digits["laps"], digits["kd"]["mode"]) == ("mlp", "digits", 3,
                                                                                          "auto")
    assert (digits["window"]["min_blocks"], digits["window"]["max_blocks"]) == (1, 2)
    llm = job.load_spec(ROOT / "jobs/llm-tiny.toml")
    assert (llm["model"], llm["dataset"], llm["laps"], job.task(llm)) == ("llama-tiny", "text:pydoc", 1, "lm")
    assert llm["window"]["train_stem"] is False and llm["window"]["train_head"] is False
    assert job.load_spec(ROOT / "jobs/vgg11-digits32.toml")["model"] == "vgg11"


def test_demo_job_is_package_data_equal_to_digits_noniid() -> None:
    assert (ROOT / "snakenode/jobs/demo.toml").read_text() == (ROOT / "jobs/digits-noniid.toml").read_text()
    assert job.parse_spec(job.demo_spec_text()) == job.load_spec(ROOT / "jobs/digits-noniid.toml")


def test_dataset_names_mirror_the_data_module() -> None:
    assert job.DATASET_NAMES == data.DATASET_NAMES


# ---------------------------------------------------------------------------------------------- schema


def test_defaults_are_architecture_md() -> None:
    s = spec()
    assert s["name"] == "mlp-digits" and s["model_args"] == {}
    assert {k: s[k] for k in ("mode", "coordinator", "fallback", "laps", "target_metric", "seed",
                              "transfer_dtype")} == {"mode": "p2p", "coordinator": "", "fallback": "none",
                                                     "laps": 1, "target_metric": 0.0, "seed": 0,
                                                     "transfer_dtype": "fp32"}
    assert s["train"] == {"epochs": 1, "batch": 32, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
                          "weight_decay": 0.0, "micro_batch": 0, "max_steps": 0, "frozen_dtype": "fp32",
                          "checkpoint_frozen": False, "seq_len": 128}
    assert s["kd"] == {"mode": "auto", "alpha": 0.5, "T": 2.0, "reference": "uniform", "auto_threshold": 0.1,
                       "balance": "softmax"}
    assert s["window"] == {"min_blocks": 1, "max_blocks": 2, "hop_time_s": 120.0, "train_stem": True,
                           "train_head": True}
    assert s["lap"] == {"drop_after_s": 30.0, "max_declines": 3}
    assert s["routing"] == {"novelty": 1.0, "compute": 0.3, "link": 0.2, "recent_hops": 3}


def test_numbers_are_normalised() -> None:
    s = spec(train={"lr": 1}, window={"hop_time_s": 60})
    assert s["train"]["lr"] == 1.0 and type(s["train"]["lr"]) is float
    assert type(s["window"]["hop_time_s"]) is float


@pytest.mark.parametrize(("raw", "key", "needle"), [
    ({**MINIMAL, "seeed": 3}, "seeed", "did you mean 'seed'"),
    ({**MINIMAL, "train": {"lrr": 0.1}}, "train.lrr", "did you mean 'lr'"),
    ({**MINIMAL, "kd": {"mode": "sometimes"}}, "kd.mode", "one of 'on', 'off', 'auto'"),
    ({**MINIMAL, "train": {"optimizer": "lion"}}, "train.optimizer", "'sgd', 'adam', 'adamw'"),
    ({**MINIMAL, "train": {"lr": 0}}, "train.lr", "a number in (0, 10]"),
    ({**MINIMAL, "train": {"lr": float("inf")}}, "train.lr", "number"),
    ({**MINIMAL, "train": {"epochs": 1.5}}, "train.epochs", "an integer in [1, 10000]"),
    ({**MINIMAL, "train": {"epochs": True}}, "train.epochs", "integer"),
    ({**MINIMAL, "train": {"momentum": 1.0}}, "train.momentum", "[0, 1)"),
    ({**MINIMAL, "kd": {"alpha": 1.5}}, "kd.alpha", "[0, 1]"),
    ({**MINIMAL, "window": {"train_head": "yes"}}, "window.train_head", "true or false"),
    ({**MINIMAL, "window": {"min_blocks": 3, "max_blocks": 2}}, "window.max_blocks", ">= window.min_blocks"),
    ({**MINIMAL, "train": {"batch": 8, "micro_batch": 16}}, "train.micro_batch", "<= train.batch"),
    ({**MINIMAL, "lap": {"max_declines": 0}}, "lap.max_declines", "[1, 1000]"),
    ({**MINIMAL, "routing": {"recent_hops": 0}}, "routing.recent_hops", "[1, 64]"),
    ({**MINIMAL, "laps": 0}, "laps", "[1, 100000]"),
    ({**MINIMAL, "mode": "mesh"}, "mode", "'p2p', 'cs'"),
    ({**MINIMAL, "mode": "cs"}, "coordinator", "required when mode = \"cs\""),
    ({**MINIMAL, "coordinator": "QmNotEd25519"}, "coordinator", "not an Ed25519 peer id"),
    ({**MINIMAL, "target_metric": 2.0}, "target_metric", "[0, 1]"),
    ({**MINIMAL, "transfer_dtype": "fp8"}, "transfer_dtype", "'fp32', 'bf16'"),
    ({**MINIMAL, "train": 3}, "train", "must be a table"),
    ({"dataset": "digits"}, "model", "required"),
    ({"model": "mlp"}, "dataset", "required"),
    ({"model": "../etc/passwd", "dataset": "digits"}, "model", "model name"),
    ({"model": "mlp", "dataset": "imagenet"}, "dataset", "allowed: digits"),
    ({"model": "mlp", "dataset": "digits:/tmp"}, "dataset", "not a valid data task"),
    ({**MINIMAL, "model_args": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, "model_args.a.b.c.d", "nest at most"),
    ({**MINIMAL, "model_args": {"x": float("nan")}}, "model_args.x", "finite"),
    ({**MINIMAL, "model_args": {"bad key!": 1}}, "model_args.bad key!", "identifiers"),
    ({**MINIMAL, "model_args": []}, "model_args", "must be a table"),
    ({**MINIMAL, "name": ""}, "name", "1..80"),
])
def test_bad_specs_name_the_key_and_the_allowed_values(raw: dict, key: str, needle: str) -> None:
    e = err(raw)
    assert e.key == key and needle in str(e) and str(e).startswith(f"{key}: ")


def test_model_args_and_lm_targets() -> None:
    s = spec(model_args={"hidden": 64, "dims": [1, 2.5], "cfg": {"act": "relu", "bias": True}})
    assert s["model_args"]["cfg"] == {"act": "relu", "bias": True}
    lm = validate_spec({"model": "llama-tiny", "dataset": "text:pydoc", "target_metric": 30.0})
    assert job.metric_name(lm) == "perplexity" and job.target_reached(lm, 29.0)
    assert not job.target_reached(lm, 31.0)
    assert job.metric_name(spec()) == "accuracy" and job.target_reached(spec(target_metric=0.9), 0.95)
    assert not job.target_reached(spec(), 1.0)                       # no target


def test_dataset_matching() -> None:
    assert job.dataset_matches("digits", "digits") and not job.dataset_matches("digits", "digits32")
    assert job.dataset_matches("text:pydoc", "text:pydoc") and not job.dataset_matches("text:pydoc", "text:/d")
    assert job.dataset_matches("cifar10", "cifar10:/data/c10") and job.dataset_matches("text", "text:pydoc")


def test_toml_errors() -> None:
    with pytest.raises(JobSpecError, match=r"my\.toml is not valid TOML"):
        job.parse_spec("model = ", "my.toml")
    with pytest.raises(JobSpecError, match="cannot read job file"):
        job.load_spec("/nonexistent/job.toml")
    assert job.parse_spec('model = "mlp"\ndataset = "digits"\n[train]\nlr = 1\n')["train"]["lr"] == 1.0


def test_mode_override() -> None:
    s = spec()
    cs = job.with_mode(s, "cs", coordinator=MALLORY.peer_id)
    assert (cs["mode"], cs["coordinator"]) == ("cs", MALLORY.peer_id) and s["mode"] == "p2p"
    with pytest.raises(JobSpecError, match="coordinator"):
        job.with_mode(s, "cs")
    with pytest.raises(JobSpecError, match="mode"):
        job.with_mode(s, "star")
    assert job.with_mode(cs, "p2p")["coordinator"] == MALLORY.peer_id


# ---------------------------------------------------------------------------------------------- encoding


def test_canonical_encoding_ignores_key_order() -> None:
    a = spec(train={"lr": 0.1, "batch": 8})
    b = dict(reversed(list(a.items())))
    b["train"] = dict(reversed(list(a["train"].items())))
    assert job.canonical(a) == job.canonical(b)
    assert list(msgpack.unpackb(job.canonical(b))) == sorted(a)
    assert job.canonical({"x": 1.0}) != job.canonical({"x": 1})        # a float stays a float64
    with pytest.raises(TypeError):
        job.canonical({1: 2})


def test_sign_verify_and_job_id() -> None:
    signed = sign_job(MINIMAL, ALICE, created=1700000000.0, nonce="ab" * 16)
    assert signed.spec == spec() and signed.submitter == ALICE.peer_id
    verify_job(signed, {ALICE.peer_id})
    assert signed.job_id == hashlib.sha256(signed.payload()).hexdigest()[:16]
    again = sign_job(MINIMAL, ALICE, created=1700000000.0, nonce="ab" * 16)
    assert again.job_id == signed.job_id                               # deterministic
    assert sign_job(MINIMAL, ALICE, created=1700000000.0, nonce="cd" * 16).job_id != signed.job_id
    fresh = sign_job(MINIMAL, ALICE)
    assert len(fresh.nonce) == 32 and fresh.job_id != signed.job_id


def test_wire_round_trip() -> None:
    signed = sign_job({**MINIMAL, "model_args": {"hidden": [64, 32]}}, ALICE)
    wire = signed.encode()
    back = SignedJob.decode(wire)
    assert back == signed and back.job_id == signed.job_id
    verify_job(back, {ALICE.peer_id})


def test_verify_rejections_are_named() -> None:
    signed = sign_job(MINIMAL, ALICE)
    with pytest.raises(JobRejected) as info:
        verify_job(signed, {MALLORY.peer_id})
    assert info.value.reason == "untrusted_submitter" and "snakenode trust add" in str(info.value)
    tampered = SignedJob({**signed.spec, "laps": 99}, signed.submitter, signed.created, signed.nonce, signed.sig)
    with pytest.raises(JobRejected) as info:
        verify_job(tampered, {ALICE.peer_id})
    assert info.value.reason == "bad_signature"
    forged = SignedJob(signed.spec, ALICE.peer_id, signed.created, signed.nonce,
                       MALLORY.sign(job.SIGN_DOMAIN + signed.payload()))
    with pytest.raises(JobRejected, match="bad_signature"):
        verify_job(forged, {ALICE.peer_id})
    # A trusted key that signs a spec this node's schema refuses, or an incomplete one.
    for bad_spec, needle in (({**signed.spec, "laps": 0}, "laps"), (dict(MINIMAL), "normalised form"),
                             ({**signed.spec, "evil": 1}, "evil")):
        unsigned = SignedJob(bad_spec, ALICE.peer_id, 1.0, "00" * 16, b"")
        bad = SignedJob(bad_spec, ALICE.peer_id, 1.0, "00" * 16, ALICE.sign(job.SIGN_DOMAIN + unsigned.payload()))
        with pytest.raises(JobRejected) as info:
            verify_job(bad, {ALICE.peer_id})
        assert info.value.reason == "invalid_spec" and needle in str(info.value)


def test_decode_is_strict() -> None:
    good = sign_job(MINIMAL, ALICE).to_dict()

    def wire(**over: object) -> bytes:
        return msgpack.packb({**good, **over}, use_bin_type=True)

    extra = msgpack.packb({**good, "x": 1}, use_bin_type=True)
    missing = msgpack.packb({k: v for k, v in good.items() if k != "nonce"}, use_bin_type=True)
    cases = [b"", b"\xc1", b"\x93\x01\x02", wire(v=2), wire(v=True), wire(spec=[1]), wire(submitter=5),
             wire(created=1), wire(created=float("nan")), wire(nonce="xyz"), wire(sig=b"short"),
             wire(sig="x" * 64), extra, missing, b"\x00" * (job.MAX_JOB_BYTES + 1),
             wire(spec={"model_args": list(range(5000))})]
    for data_ in cases:
        with pytest.raises(JobRejected) as info:
            SignedJob.decode(data_)
        assert info.value.reason == "malformed"
    with pytest.raises(JobRejected, match="upgrade"):
        SignedJob.decode(wire(v=2))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_decode_never_raises_anything_else(blob: bytes) -> None:
    try:
        SignedJob.decode(blob)
    except JobRejected as exc:
        assert exc.reason == "malformed"


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=4), max_leaves=12))
def test_validate_spec_rejects_garbage_with_a_named_error(junk: object) -> None:
    raw = {**MINIMAL, "train": junk} if not isinstance(junk, dict) else {**MINIMAL, **junk}
    try:
        validate_spec(raw)
    except JobSpecError as exc:
        assert exc.key
