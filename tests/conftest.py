"""Shared fixtures. Integration tests run real processes (see harness.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Net  # noqa: E402


@pytest.fixture
def tmp_net(tmp_path: Path) -> Iterator[Net]:
    net = Net(tmp_path, network=f"t{os.getpid() % 100000}")
    try:
        yield net
    finally:
        net.close()
