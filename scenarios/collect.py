"""Reading what the hosts wrote, while they run and after: hop logs and fault-hook lines in node logs.

Hop logs are read straight from each host's home (HOME/jobs/<job>/hoplog.jsonl and seen.jsonl), which works
for every backend (namespaces and containers share the runner's filesystem) and for hosts that are frozen
or dead, where the control socket would not answer. Files are tailed by byte offset; a line cut short by a
crash is left for the next read (or skipped at the end, as hoplog.read_log does).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snakenode.snake import hoplog

LOG_FILES = ("hoplog.jsonl", "seen.jsonl")


@dataclass
class Tail:
    path: Path
    offset: int = 0

    def read_new(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return data[: end + 1].decode("utf-8", errors="replace").splitlines()


@dataclass
class HopLogs:
    """New hop-log records of one job across every host, each once, in the order the runner saw them."""

    homes: dict[str, Path]
    job_id: str
    tails: dict[tuple[str, str], Tail] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)

    def poll(self) -> list[dict[str, Any]]:
        out = []
        for host, home in self.homes.items():
            for name in LOG_FILES:
                tail = self.tails.setdefault((host, name), Tail(home / "jobs" / self.job_id / name))
                for line in tail.read_new():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(rec, dict) or hoplog.validate_record(rec):
                        continue
                    key = json.dumps(rec, sort_keys=True)
                    if key not in self.keys:
                        self.keys.add(key)
                        out.append(rec)
        return out


def all_records(homes: Iterable[Path], job_id: str) -> list[dict[str, Any]]:
    """Every host's records of a job, merged (duplicates removed) and validated record by record."""
    logs = []
    for home in homes:
        for name in LOG_FILES:
            p = home / "jobs" / job_id / name
            if p.exists():
                logs.append([r for r in hoplog.read_log(p) if not hoplog.validate_record(r)])
    return hoplog.merge(*logs)


@dataclass
class HookLines:
    """`fault_injected` lines in a node's log: when a protocol-phase hook fired, and at which phase."""

    path: Path
    tail: Tail | None = None

    def poll(self) -> list[dict[str, Any]]:
        if self.tail is None:
            self.tail = Tail(self.path)
        out = []
        for line in self.tail.read_new():
            parts = line.split(" ")
            if len(parts) < 4 or parts[2] != "faults" or parts[3] != "fault_injected":
                continue
            fields = dict(p.split("=", 1) for p in parts[4:] if "=" in p)
            out.append({"t": clock_to_unix(parts[0]), **fields})
        return out


def clock_to_unix(stamp: str, now: float | None = None) -> float:
    """`HH:MM:SS.mmm` (a node log's local time of day) -> unix seconds, the most recent such moment."""
    now = time.time() if now is None else now
    try:
        hms, _, ms = stamp.partition(".")
        h, m, s = (int(x) for x in hms.split(":"))
    except ValueError:
        return now
    lt = time.localtime(now)
    midnight = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
    t = midnight + h * 3600 + m * 60 + s + int(ms or 0) / 1000
    return t - 86400 if t > now + 60 else t
