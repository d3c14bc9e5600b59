"""A node's profile: what it advertises to the network, and the strict decoder for profiles it hears.

Modelled on Petals' ServerInfo: a flat record, tolerant of unknown fields (newer peers may add some),
strict about the fields it knows (they feed routing decisions). `seq` orders a node's profiles:
nanoseconds since the epoch at publication, so a restarted node's first profile supersedes its old ones.
"""

from __future__ import annotations

import re
from typing import Any

from snakenode import wire

ROLES = ("node", "coordinator", "bootstrap")
STATES = ("idle", "reserved", "training", "sending", "receiving", "waiting")
TASKS = ("classification", "lm")
MAX_CLASSES = 1000
ADDR_RE = re.compile(r"^/[\x21-\x7e]{1,255}$")


def decode(obj: Any) -> dict[str, Any]:
    """Validate a profile map from the network; returns a clean copy of the fields we use."""
    f = wire.Fields(obj, "profile")
    out: dict[str, Any] = {
        "v": f.int("v", 1, 1000),
        "peer_id": f.str("peer_id", 64, pattern=wire.PEER_ID_RE),
        "seq": f.int("seq"),
        "addrs": f.str_list("addrs", max_items=32, max_len=256, pattern=ADDR_RE),
        "role": f.choice("role", ROLES),
        "version": f.str("version", 32),
        "network": f.str("network", 32),
        "memory_mb": f.int("memory_mb", 0, 2**40, required=False),
        "jobs": f.str_list("jobs", max_items=64, max_len=16, required=False, pattern=wire.JOB_ID_RE),
        "preparing": f.str_list("preparing", max_items=64, max_len=16, required=False, pattern=wire.JOB_ID_RE),
        "lane_port": f.int("lane_port", 0, 65535, required=False) if f.has("lane_port") else None,
    }
    if f.has("compute"):
        c = f.map("compute")
        out["compute"] = {"samples_per_s": c.float("samples_per_s", 0, 1e12),
                          "workload": c.str("workload", 64, required=False)}
    else:
        out["compute"] = None
    if f.has("data"):
        d = f.map("data")
        hist = d.int_list("label_hist", max_items=MAX_CLASSES, required=False) if d.has("label_hist") else None
        out["data"] = {
            "dataset": d.str("dataset", 128),
            "task": d.choice("task", TASKS),
            "samples": d.int("samples", 0, 2**40),
            "num_classes": d.int("num_classes", 0, MAX_CLASSES, required=False) if d.has("num_classes") else None,
            "label_hist": hist,
            "tokens": d.int("tokens", 0, 2**50, required=False) if d.has("tokens") else None,
            "fingerprint": d.str("fingerprint", 128, required=False),
        }
    else:
        out["data"] = None
    if f.has("state"):
        s = f.map("state")
        out["state"] = {
            "kind": s.choice("kind", STATES),
            "job": s.str("job", 16, required=False) or None,
            "hop": s.int("hop", 0, 2**40, required=False) if s.has("hop") else None,
        }
    else:
        out["state"] = {"kind": "idle", "job": None, "hop": None}
    return out


def encode(profile: dict[str, Any]) -> bytes:
    data = wire.packb({"t": "profile", **profile})
    if len(data) > wire.GOSSIP_MAX:
        raise wire.WireError(f"profile of {len(data)} bytes exceeds {wire.GOSSIP_MAX}", "oversize")
    return data
