"""Summarise sitecustomize.py's snapshots between two unix times: python summarize.py DIR T0 T1."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def at(rows: list[dict], t: float) -> dict:
    best = {"c": {}}
    for r in rows:
        if r["t"] <= t:
            best = r
    return best["c"]


def main() -> None:
    d, t0, t1 = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    total: Counter[str] = Counter()
    per: dict[str, Counter[str]] = {}
    for f in sorted(d.glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        argv = rows[-1]["argv"]
        role = "boot" if "bootstrap" in argv else "node"
        a, b = at(rows, t0), at(rows, t1)
        diff = Counter({k: b.get(k, 0) - a.get(k, 0) for k in b})
        per[f"{role}:{f.stem}"] = diff
        total.update(diff)
    span = t1 - t0
    print(f"window {span:.1f} s, {len(per)} processes")
    for k in sorted(total, key=lambda k: -total[k]):
        if total[k]:
            print(f"  {k:60s} {total[k]:>12,}  {total[k] / span:>10,.0f}/s")
    for name, c in per.items():
        print(name, f"noise.out={c.get('noise.out', 0):,}", f"rpc={c.get('rpc.total.out', 0):,}")


if __name__ == "__main__":
    main()
