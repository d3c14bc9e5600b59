"""Which number tells how good a model is, and which way is better.

A classification job is judged by accuracy (higher is better), a language-model job by perplexity (lower is
better). Every place that shows a result (demo summary, `jobs`, `watch`, reports) names the metric through
this module, so an LM result of 168.2 never reads like a failed accuracy of "-". Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: metric name -> higher is better; the order is the order of preference when several are present.
METRICS: dict[str, bool] = {"accuracy": True, "perplexity": False}


@dataclass(frozen=True)
class Metric:
    name: str
    value: float | None
    higher_is_better: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "higher_is_better": self.higher_is_better}

    @property
    def label(self) -> str:
        """e.g. 'perplexity (lower is better)'."""
        return f"{self.name} ({'higher' if self.higher_is_better else 'lower'} is better)"

    def text(self, digits: int = 4) -> str:
        return "-" if self.value is None else f"{self.value:.{digits}f}"


def metric_name(metrics: Mapping[str, Any] | None, task: str | None = None) -> str:
    """The metric a result carries, else the one its task uses ('lm' tasks use perplexity)."""
    for name in METRICS:
        if metrics and isinstance(metrics.get(name), int | float):
            return name
    return "perplexity" if task == "lm" else "accuracy"


def of(metrics: Mapping[str, Any] | None, task: str | None = None) -> Metric:
    """The metric of an evaluation result (`{"accuracy": ...}` or `{"perplexity": ...}`), value None if absent."""
    name = metric_name(metrics, task)
    raw = (metrics or {}).get(name)
    value = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
    return Metric(name, value, METRICS[name])


def short(metrics: Mapping[str, Any] | None) -> str:
    """Compact form for tables: 'acc=0.912' or 'ppl=168.20'; '-' when there is no metric."""
    m = of(metrics)
    if m.value is None:
        return "-"
    return f"acc={m.value:.3f}" if m.name == "accuracy" else f"ppl={m.value:.2f}"
