"""Named counters: errors, rejections and bytes, reported in `snakenode status --json` `counters`.

Kinds are dotted names (`bytes.gossip.out`, `reject.bundle.hash_mismatch`, `error.handler.negotiate`).
Every kind in use is documented in docs/PROTOCOL.md; a test checks that the documented list covers the
kinds a real node produces.
"""

from __future__ import annotations

from collections import Counter


class Counters:
    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1) -> None:
        self._c[kind] += n

    def get(self, kind: str) -> int:
        return self._c.get(kind, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._c.items()))

    def total(self, prefix: str) -> int:
        return sum(v for k, v in self._c.items() if k.startswith(prefix))
