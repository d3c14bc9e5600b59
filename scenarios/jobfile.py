"""Write a scenario's merged job spec back to TOML, so it is submitted with the ordinary
`snakenode submit FILE --home DIR` (the same path a user takes), not through a private API.

A small writer is enough: job specs hold strings, numbers, booleans, lists and tables (model_args may nest,
written as inline tables). Pure: text in, text out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from snakenode.identity import peer_id_from_public

# A syntactically valid peer id that nobody holds: it stands in for the coordinator while a scenario is
# validated, before the coordinator host has an identity (the runner puts the real peer id in).
PLACEHOLDER_COORDINATOR = peer_id_from_public(bytes(32))


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to a job file")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(x)}" for k, x in v.items() if x is not None) + "}"
    raise ValueError(f"cannot write {type(v).__name__} to a job file")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dumps(spec: Mapping[str, Any]) -> str:
    """TOML text for a job spec: scalars first, then one [table] per table-valued key."""
    lines = ["# written by the scenario runner: the job file with the scenario's `set` overrides applied"]
    tables = []
    for k, v in spec.items():
        if v is None or (k == "coordinator" and v == ""):
            continue
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in tables:
        lines += ["", f"[{_key(k)}]"]
        lines += [f"{_key(a)} = {_scalar(b)}" for a, b in v.items() if b is not None]
    return "\n".join(lines) + "\n"
