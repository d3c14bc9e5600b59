"""Content-addressed layer store on disk (torch-free).

A blob's name *is* its sha256, so a blob in the store is trustworthy by construction: every write path
(whole bytes or a resumed partial download) verifies the hash before the blob becomes visible, and the
visible file appears by an atomic rename. Daemon and worker share the store; the worker writes blobs here
and the daemon ships them, so tensors never cross the process boundary as pickles.

Layout under `root` (normally HOME/store):
    blobs/<hash>.safetensors     complete, verified blobs
    partial/<hash>.part          downloads in progress (resume at their current size)
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """A bad hash string, a missing blob or a failed write. The message says what to do."""


class BlobHashMismatch(StoreError):
    """Bytes whose sha256 is not the hash they were stored under (code `hash_mismatch`)."""

    code = "hash_mismatch"


def check_hash(h: str) -> str:
    """Hashes become file names: only 64 lowercase hex characters may pass (no path tricks)."""
    if not isinstance(h, str) or not _HASH_RE.match(h):
        raise StoreError(f"not a layer hash (64 lowercase hex): {h!r}")
    return h


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialBlob:
    """An open partial download: append bytes from `offset`; `LayerStore.commit_partial` verifies it.

    The hash is updated as bytes arrive so committing a large blob does not reread it."""

    def __init__(self, path: Path, expected_hash: str, max_size: int | None) -> None:
        self.path = path
        self.expected_hash = expected_hash
        self.max_size = max_size
        self._hasher = hashlib.sha256()
        existing = path.stat().st_size if path.exists() else 0
        if max_size is not None and existing > max_size:
            path.unlink()                        # a stale partial longer than the blob can be: restart
            existing = 0
        with open(path, "ab") as f:              # create, and hash what is already there
            pass
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                self._hasher.update(chunk)
        self._file = open(path, "ab")  # noqa: SIM115 - closed by close()/commit
        self.offset = existing

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._file.closed:
            raise StoreError(f"partial {self.expected_hash[:12]} is closed; open it again to resume")
        n = len(data)
        if self.max_size is not None and self.offset + n > self.max_size:
            raise StoreError(f"partial {self.expected_hash[:12]}: {self.offset + n} bytes exceed the announced "
                             f"size {self.max_size} (oversize); the sender must resend from offset {self.offset}")
        self._file.write(data)
        self._hasher.update(data)
        self.offset += n
        return n

    def current_hash(self) -> str:
        return self._hasher.hexdigest()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> PartialBlob:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class LayerStore:
    """Blobs by sha256 under `root`. Safe for one writer per blob plus any number of readers."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def path(self, h: str) -> Path:
        return self.blobs / f"{check_hash(h)}.safetensors"

    def partial_path(self, h: str) -> Path:
        return self.partial / f"{check_hash(h)}.part"

    def has(self, h: str) -> bool:
        return self.path(h).is_file()

    def size(self, h: str) -> int:
        return self.path(h).stat().st_size

    def get_bytes(self, h: str) -> bytes:
        try:
            return self.path(h).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"layer blob {h[:12]} is not in the store at {self.blobs}; fetch it from a peer "
                             "or rebuild the job's model") from None

    def put_bytes(self, data: bytes | bytearray | memoryview, expected_hash: str | None = None) -> str:
        """Store bytes, return their hash. With `expected_hash`, refuse bytes that do not match it."""
        h = sha256_hex(data)
        if expected_hash is not None and check_hash(expected_hash) != h:
            raise BlobHashMismatch(f"hash_mismatch: blob bytes hash to {h[:12]}, expected {expected_hash[:12]}")
        dest = self.path(h)
        if dest.is_file():
            return h
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.blobs)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.blobs)
        return h

    def put_file(self, src: str | os.PathLike[str], expected_hash: str | None = None) -> str:
        """Move a finished file (same filesystem) into the store after hashing it."""
        src = Path(src)
        hasher = hashlib.sha256()
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                hasher.update(chunk)
        h = hasher.hexdigest()
        if expected_hash is not None and check_hash(expected_hash) != h:
            raise BlobHashMismatch(f"hash_mismatch: file {src} hashes to {h[:12]}, expected {expected_hash[:12]}")
        os.replace(src, self.path(h))
        return h

    def open_partial(self, h: str, size: int | None = None) -> PartialBlob:
        """Resume (or start) a download of blob `h`: append at `.offset`. `size` caps the bytes accepted."""
        if self.has(h):
            raise StoreError(f"blob {h[:12]} is already complete; nothing to resume")
        return PartialBlob(self.partial_path(h), h, size)

    def partial_offset(self, h: str) -> int:
        p = self.partial_path(h)
        return p.stat().st_size if p.exists() else 0

    def commit_partial(self, part: PartialBlob | str) -> str:
        """Verify a finished partial download and make it a blob. On a mismatch the partial is deleted
        (resuming bad bytes would never succeed) and BlobHashMismatch is raised."""
        if isinstance(part, str):
            part = PartialBlob(self.partial_path(part), part, None)
        part.close()
        got = part.current_hash()
        if got != part.expected_hash:
            part.path.unlink(missing_ok=True)
            raise BlobHashMismatch(f"hash_mismatch: downloaded {part.offset} bytes hash to {got[:12]}, expected "
                                   f"{part.expected_hash[:12]}; partial deleted, request the blob again from offset 0")
        os.replace(part.path, self.path(part.expected_hash))
        _fsync_dir(self.blobs)
        return part.expected_hash

    def discard_partial(self, h: str) -> None:
        self.partial_path(h).unlink(missing_ok=True)

    def hashes(self) -> list[str]:
        return sorted(p.name.removesuffix(".safetensors") for p in self.blobs.glob("*.safetensors")
                      if _HASH_RE.match(p.name.removesuffix(".safetensors")))

    def gc(self, keep: Iterable[str]) -> int:
        """Delete every blob and partial not in `keep`; return the bytes freed."""
        keep_set = {check_hash(h) for h in keep}
        freed = 0
        for d, suffix in ((self.blobs, ".safetensors"), (self.partial, ".part")):
            for p in d.iterdir():
                name = p.name.removesuffix(suffix)
                if name in keep_set and p.name.endswith(suffix):
                    continue
                if p.name.startswith(".tmp-"):
                    continue                     # a write in progress (its owner renames or removes it)
                try:
                    freed += p.stat().st_size
                    p.unlink()
                except FileNotFoundError:
                    pass
        return freed
