"""`snakenode demo` end to end: a real local network, one job, and a summary that names the job's metric.

A language-model job is judged by perplexity (lower is better): the summary must say so instead of showing an
empty "final test accuracy" (issue: LM results read as if the job failed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snakenode import metric

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "snakenode.cli", "demo", "--out", str(tmp / "demo"), "--json", *args],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, f"demo failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.timeout(300)
def test_lm_demo_names_perplexity_and_its_direction(tmp_path: Path) -> None:
    summary, shown = _demo(tmp_path, "--nodes", "2", "--dataset", "text:pydoc", "--partition", "shards:2",
                           "--job", str(ROOT / "jobs/llm-tiny.toml"))
    fm = summary["final_metric"]
    assert fm["name"] == "perplexity" and fm["higher_is_better"] is False
    assert fm["value"] == summary["final_test"]["perplexity"] > 1.0
    assert summary["final_accuracy"] is None
    assert "final test perplexity (lower is better)" in shown
    assert "final test accuracy" not in shown
    assert "mean post-hop validation perplexity" in shown


@pytest.mark.timeout(300)
def test_classification_demo_reports_accuracy_as_final_metric(tmp_path: Path) -> None:
    summary, shown = _demo(tmp_path, "--nodes", "2", "--laps", "1")
    fm = summary["final_metric"]
    assert fm == {"name": "accuracy", "value": summary["final_accuracy"], "higher_is_better": True}
    assert 0.5 < fm["value"] <= 1.0, "one lap of the digits MLP over two nodes learns well past chance (0.1)"
    assert "final test accuracy (higher is better)" in shown


def test_metric_of_picks_the_task_metric_and_direction() -> None:
    assert metric.of({"accuracy": 0.9, "loss": 0.3}).as_dict() == {"name": "accuracy", "value": 0.9,
                                                                    "higher_is_better": True}
    assert metric.of({"perplexity": 168.2, "loss": 5.1}).label == "perplexity (lower is better)"
    assert metric.of(None, "lm") == metric.Metric("perplexity", None, False)
    assert metric.of(None, "classification").text() == "-"
    assert metric.short({"perplexity": 168.234}) == "ppl=168.23"
