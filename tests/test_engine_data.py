"""train/data.py: flags, datasets read offline without importing their packages, splits and partitions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from snakenode.train import data as D


def test_daemon_import_stays_light() -> None:
    code = ("import sys; from snakenode.train import data as D; "
            "s = D.stats(D.DataSpec.from_flags('digits', 'iid', '0/2', 1)); "
            "bad = [m for m in ('torch', 'sklearn', 'mlxtend') if m in sys.modules]; "
            "print(s['samples'], bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    samples, bad = out.stdout.split(" ", 1)
    assert int(samples) > 600
    assert bad.strip() == "[]"


@pytest.mark.parametrize("flag,msg", [
    ("nope", "--data: unknown dataset"), ("digits:x", "takes no path"), ("cifar10", "needs a path"),
    ("text", "needs a path")])
def test_data_flag_errors_name_flag(flag: str, msg: str) -> None:
    with pytest.raises(D.DataError, match=msg) as e:
        D.parse_data_flag(flag)
    assert "allowed:" in str(e.value)


@pytest.mark.parametrize("flag", ["dirichlet", "dirichlet:-1", "dirichlet:x", "shards:0", "shards", "iid:2", "x"])
def test_partition_flag_errors(flag: str) -> None:
    with pytest.raises(D.DataError, match="--partition: .*allowed: iid, dirichlet:A"):
        D.parse_partition_flag(flag)


@pytest.mark.parametrize("flag", ["4/4", "1", "a/2", "-1/3", "0/0"])
def test_shard_flag_errors(flag: str) -> None:
    with pytest.raises(D.DataError, match="--shard"):
        D.parse_shard_flag(flag)


def test_spec_round_trip_and_canonical() -> None:
    s = D.DataSpec.from_flags("text:pydoc", "dirichlet:0.30", "2/5", 9)
    assert s.partition == "dirichlet:0.3" and (s.shard_index, s.shard_count) == (2, 5)
    assert D.DataSpec.from_dict(s.to_dict()) == s
    with pytest.raises(D.DataError):
        D.DataSpec.from_dict({**s.to_dict(), "extra": 1})
    with pytest.raises(D.DataError, match="--shard"):
        D.DataSpec("digits", None, "iid", 3, 3, 0)


@pytest.mark.parametrize("name,n,shape", [("digits", 1797, (1, 8, 8)), ("mnist5k", 5000, (1, 28, 28)),
                                          ("digits32", 1797, (3, 32, 32)), ("mnist32", 5000, (3, 32, 32)),
                                          ("synthetic", D.SYNTHETIC_SAMPLES, (1, 8, 8))])
def test_image_datasets(name: str, n: int, shape: tuple[int, ...]) -> None:
    ds = D.load_dataset(name)
    assert len(ds) == n and ds.input_shape == shape and ds.num_classes == 10
    x = ds.features(np.arange(5))
    assert x.shape == (5, *shape) and x.dtype == np.float32 and np.isfinite(x).all()
    if name == "synthetic":  # standard-normal features around class centres, not pixel intensities
        assert x.min() < 0.0 < x.max() and 0.5 < ds.features(np.arange(200)).std() < 2.0
    else:
        assert 0.0 <= x.min() and 0.0 < x.max() <= 1.0 + 1e-6
    assert np.bincount(ds.labels).min() > 100


def test_partitions_disjoint_deterministic_and_cover() -> None:
    labels = D.load_dataset("digits").labels
    for part in ("iid", "dirichlet:0.3", "shards:2"):
        a = D.partition_assignment(labels, part, 5, seed=3)
        b = D.partition_assignment(labels, part, 5, seed=3)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        allidx = np.concatenate(a)
        assert len(allidx) == len(np.unique(allidx)) == len(labels)
        c = D.partition_assignment(labels, part, 5, seed=4)
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # dirichlet 0.3 and shards are label-skewed, iid is not
    skew = [D.js_divergence(np.bincount(labels[p], minlength=10), np.ones(10))
            for p in D.partition_assignment(labels, "dirichlet:0.3", 5, 3)]
    flat = [D.js_divergence(np.bincount(labels[p], minlength=10), np.ones(10))
            for p in D.partition_assignment(labels, "iid", 5, 3)]
    assert min(skew) > max(flat)
    shard_classes = [len(np.unique(labels[p])) for p in D.partition_assignment(labels, "shards:2", 5, 3)]
    assert max(shard_classes) <= 4


@pytest.mark.parametrize("data,part", [("digits", "dirichlet:0.5"), ("text:pydoc", "iid"), ("mnist5k", "shards:2")])
def test_test_split_never_in_a_partition(data: str, part: str) -> None:
    splits = [D.node_split(D.DataSpec.from_flags(data, part, f"{i}/4", 11)) for i in range(4)]
    test = splits[0].test
    ds = D.load_dataset(*D.parse_data_flag(data))
    assert abs(len(test) - 0.2 * len(ds)) <= 10
    seen: set[int] = set()
    for s in splits:
        assert np.array_equal(s.test, test)
        local = set(s.local.tolist())
        assert not local & set(test.tolist())
        assert not set(s.train.tolist()) & set(s.val.tolist())
        assert not local & seen
        seen |= local
        assert len(s.val) >= 1
    assert len(seen) + len(test) == len(ds)
    # stratified: every class keeps ~20% in test
    if ds.task == "classification":
        frac = np.bincount(ds.labels[test], minlength=10) / np.bincount(ds.labels, minlength=10)
        assert np.all(np.abs(frac - 0.2) < 0.02)


def test_stats_schema_and_fingerprint() -> None:
    s0 = D.stats(D.DataSpec.from_flags("digits", "dirichlet:0.3", "0/4", 1))
    s1 = D.stats(D.DataSpec.from_flags("digits", "dirichlet:0.3", "1/4", 1))
    assert set(s0) == {"dataset", "task", "samples", "num_classes", "label_hist", "tokens", "fingerprint"}
    assert s0["dataset"] == "digits" and s0["task"] == "classification" and s0["tokens"] == 0
    assert sum(s0["label_hist"]) == s0["samples"] and len(s0["label_hist"]) == 10
    assert s0["fingerprint"] != s1["fingerprint"]
    t = D.stats(D.DataSpec.from_flags("text:pydoc", "iid", "0/2", 1))
    assert t["task"] == "lm" and t["tokens"] > 150_000 and t["label_hist"] == [] and t["num_classes"] == 0


def test_text_dir_and_split(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 600)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    spec = D.DataSpec.from_flags(f"text:{tmp_path}", "iid", "0/1", 0)
    tr = D.load_split(spec, "train")
    assert tr.task == "lm" and tr.texts and all("document" in t for t in tr.texts)
    assert D.byte_tokens("aé").tolist() == [97, 195, 169]


def _write_cifar_bin(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
        rec[:, 0] = np.arange(n) % 10
        (root / name).write_bytes(rec.tobytes())


def test_cifar_binary_read_and_pickle_refused(tmp_path: Path) -> None:
    binroot = tmp_path / "cifar-10-batches-bin"
    binroot.mkdir()
    _write_cifar_bin(binroot, 20)
    ds = D.load_dataset("cifar10", str(tmp_path))
    assert len(ds) == 120 and ds.features(np.array([0])).shape == (1, 3, 32, 32)
    raw = (binroot / "data_batch_1.bin").read_bytes()
    assert ds.labels[3] == raw[3 * 3073]
    assert np.allclose(ds.features(np.array([3]))[0, 0, 0, :4] * 255, list(raw[3 * 3073 + 1:3 * 3073 + 5]))
    py = tmp_path / "py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x04junk")
    with pytest.raises(D.DataError, match="python-pickle version .* refuses .*binary"):
        D.load_dataset("cifar10", str(py))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data_batch_1.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(D.DataError, match="truncated"):
        D.load_dataset("cifar10", str(bad))


def test_js_divergence() -> None:
    assert D.js_divergence([1, 1], [2, 2]) == pytest.approx(0.0)
    assert D.js_divergence([1, 0], [0, 1]) == pytest.approx(np.log(2))
