"""PNG plots of a run (matplotlib, Agg backend: no display needed): accuracy over time with the faults
marked, bytes moved per hop, and the snake's path over the hosts, lap by lap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scenarios.expect import Facts

FAULT_COLORS = {"kill": "red", "stop": "orange", "continue": "green", "leave": "purple", "start": "green",
                "restart": "brown", "partition": "black", "heal": "green", "link_down": "black",
                "link_up": "green", "throttle": "blue", "hook": "red", "join": "teal"}


def _mpl() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_faults(ax: Any, faults: list[dict[str, Any]]) -> None:
    top = ax.get_ylim()[1]
    for f in faults:
        if f["t"] is None:
            continue
        color = FAULT_COLORS.get(f["kind"], "grey")
        ax.axvline(f["t"], color=color, linestyle="--", linewidth=1, alpha=0.8)
        ax.text(f["t"], top, f" {f['kind']} {f['target']}", rotation=90, va="top", ha="right", fontsize=7,
                color=color)


def accuracy(report: dict[str, Any], job: str, out: Path) -> Path:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    hops = [h for h in report["hops"] if h["job"] == job and h["metrics_after"]]
    ok = [h for h in hops if h["surviving"] and h["t_train_end"] is not None]
    other = [h for h in hops if not h["surviving"] and h["t_train_end"] is not None]
    if ok:
        ax.plot([h["t_train_end"] for h in ok], [h["metrics_after"].get("accuracy", float("nan")) for h in ok],
                marker="o", label="post-hop validation accuracy (holder's local split)")
    if other:
        ax.scatter([h["t_train_end"] for h in other], [h["metrics_after"].get("accuracy", float("nan")) for h in other],
                   marker="x", color="grey", label="hops off the surviving lineage")
    j = next((x for x in report["jobs"] if x["name"] == job), None)
    if j and j.get("test") and j.get("completed_t") is not None and "accuracy" in j["test"]:
        ax.scatter([j["completed_t"]], [j["test"]["accuracy"]], marker="*", s=200, color="gold", edgecolor="black",
                   zorder=5, label=f"final test accuracy {j['test']['accuracy']:.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since submission")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report['scenario']}: accuracy over time ({job})")
    _mark_faults(ax, report["faults"])
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def bytes_per_hop(report: dict[str, Any], job: str, out: Path) -> Path:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(9, 4))
    hops = [h for h in report["hops"] if h["job"] == job]
    ok = [h for h in hops if h["surviving"]]
    other = [h for h in hops if not h["surviving"]]
    ax.bar([h["hop"] for h in ok], [h["bytes_in"] / 1e3 for h in ok], color="tab:blue",
           label="bundle received (surviving lineage)")
    if other:
        ax.bar([h["hop"] + 0.3 for h in other], [h["bytes_in"] / 1e3 for h in other], width=0.3, color="tab:red",
               label="bundle received by a lost or rival attempt")
    ax.set_xlabel("hop")
    ax.set_ylabel("kB")
    ax.set_title(f"{report['scenario']}: bytes per hop ({job})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def path(report: dict[str, Any], job: str, out: Path) -> Path:
    plt = _mpl()
    names = [h["name"] for h in report["hosts"]]
    index = {n: i for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.45 * len(names) + 1.5)))
    hops = sorted((h for h in report["hops"] if h["job"] == job), key=lambda h: h["hop"])
    ok = [h for h in hops if h["surviving"] and h["holder"] in index]
    cmap = plt.get_cmap("tab10")
    laps = sorted({h["lap"] for h in ok})
    for lap in laps:
        seg = [h for h in ok if h["lap"] == lap]
        # Join each lap to the previous hop so the path reads as one line.
        prev = [h for h in ok if h["hop"] == seg[0]["hop"] - 1]
        pts = prev + seg
        ax.plot([h["hop"] for h in pts], [index[h["holder"]] for h in pts], marker="o", color=cmap(lap % 10),
                label=f"lap {lap}")
    bad = [h for h in hops if not h["surviving"] and h["holder"] in index]
    if bad:
        ax.scatter([h["hop"] for h in bad], [index[h["holder"]] for h in bad], marker="x", s=80, color="red",
                   zorder=5, label="lost / rival attempt")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_xlabel("hop")
    ax.set_title(f"{report['scenario']}: the snake's path over the hosts ({job})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw(report: dict[str, Any], facts: dict[str, Facts], out_dir: Path) -> list[str]:
    files = []
    for job in facts:
        suffix = "" if len(facts) == 1 else f"-{job}"
        files.append(accuracy(report, job, out_dir / f"accuracy{suffix}.png"))
        files.append(bytes_per_hop(report, job, out_dir / f"bytes_per_hop{suffix}.png"))
        files.append(path(report, job, out_dir / f"path{suffix}.png"))
    return [str(f) for f in files]
