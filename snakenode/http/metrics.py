"""Prometheus metrics of a node, through prometheus_client (names in docs/OPERATIONS.md, "HTTP endpoints").

The node's Counters stay the one place that counts; they are mirrored at scrape time by a custom collector
(counters by protocol/kind), so nothing is counted twice. Gauges are read from the status and jobs
documents at scrape time. Histograms are observed as events happen: the event-loop lag by the LagMonitor,
hop training time and hand-off phases from the node's hop-log records (http/timings.py) on each refresh.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

from snakenode.http.lag import LagMonitor
from snakenode.http.sources import Sources
from snakenode.http.timings import Timings

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TRAIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def split_counter(kind: str) -> tuple[str, dict[str, str]] | None:
    """A Counters kind -> (metric family, labels). `bytes.gossip.jobs.out` -> bytes, protocol=gossip.jobs."""
    parts = kind.split(".")
    head = parts[0]
    if head == "bytes" and len(parts) >= 3 and parts[-1] in ("in", "out"):
        return "bytes", {"protocol": ".".join(parts[1:-1]), "direction": parts[-1]}
    if head == "reject" and len(parts) >= 3:
        return "rejections", {"protocol": parts[1], "kind": ".".join(parts[2:])}
    if head == "error" and len(parts) >= 2:
        return "errors", {"kind": ".".join(parts[1:])}
    return "events", {"kind": kind}


FAMILIES = {
    "bytes": ("snakenode_bytes", "Bytes read (in) and written (out) per protocol or gossip topic",
              ("protocol", "direction")),
    "rejections": ("snakenode_rejections", "Refused input per protocol and reason", ("protocol", "kind")),
    "errors": ("snakenode_errors", "Internal failures caught and logged (the node kept serving)", ("kind",)),
    "events": ("snakenode_events", "Other counted events (lane, custody, guard...) by their counter name",
               ("kind",)),
}


class NodeCollector:
    """Counters and gauges read from the node at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []  # collected lazily: registering must not call into the node

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, CounterMetricFamily] = {
            key: CounterMetricFamily(name, doc, labels=list(labels)) for key, (name, doc, labels) in FAMILIES.items()
        }
        for kind, value in self.sources.counters().items():
            family, labels = split_counter(kind) or ("events", {"kind": kind})
            fams[family].add_metric([labels[n] for n in FAMILIES[family][2]], value)
        yield from fams.values()

        st = self.sources.status()
        info = InfoMetricFamily("snakenode_node", "Identity of this node")
        info.add_metric([], {"peer_id": str(st.get("peer_id")), "role": str(st.get("role")),
                             "network": str(st.get("network")), "version": str(st.get("version"))})
        yield info
        yield GaugeMetricFamily("snakenode_peers_up", "Peers with a live profile", value=st.get("peers") or 0)
        yield GaugeMetricFamily("snakenode_connections", "Live connections in the peer table",
                                value=st.get("connections") or 0)
        yield GaugeMetricFamily("snakenode_uptime_seconds", "Seconds since the node started",
                                value=st.get("uptime_s") or 0)
        state = GaugeMetricFamily("snakenode_state", "The node's activity (1 for the current one)",
                                  labels=["state"])
        state.add_metric([str((st.get("state") or {}).get("kind", "idle"))], 1)
        yield state
        worker = st.get("worker") or {}
        yield GaugeMetricFamily("snakenode_worker_running", "1 while the training worker process exists",
                                value=1 if worker.get("running") else 0)
        jobs = self.sources.jobs()
        by_status = GaugeMetricFamily("snakenode_jobs", "Jobs this node knows, by status", labels=["status"])
        counts: dict[str, int] = {"running": 0, "complete": 0}
        for j in jobs:
            counts[str(j.get("status"))] = counts.get(str(j.get("status")), 0) + 1
        for status, n in sorted(counts.items()):
            by_status.add_metric([status], n)
        yield by_status
        holder = GaugeMetricFamily("snakenode_holder", "1 when this node holds the snake of a running job",
                                   labels=["job_id"])
        for j in jobs:
            if j.get("status") == "running":
                holder.add_metric([str(j["job_id"])], 1 if j.get("holder") == st.get("peer_id") else 0)
        yield holder


class NodeMetrics:
    """One registry per node (never the process-global one, so several nodes can live in one test)."""

    def __init__(self, sources: Sources, lag: LagMonitor, node_id: str) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(sources))
        ProcessCollector(namespace="snakenode", registry=self.registry)
        self.lag = Histogram("snakenode_event_loop_lag_seconds", "How late the daemon's trio sleeps wake up",
                             buckets=LAG_BUCKETS, registry=self.registry)
        lag.observers.append(self.lag.observe)
        self.phase = Histogram("snakenode_handoff_phase_seconds", "Hand-off phases performed by this node "
                               "(decide, negotiate, transfer, load)", ["phase"], buckets=PHASE_BUCKETS,
                               registry=self.registry)
        self.train = Histogram("snakenode_hop_train_seconds", "Wall time of the hops this node trained",
                               buckets=TRAIN_BUCKETS, registry=self.registry)
        self.outcomes = Counter("snakenode_handoffs", "Hand-offs this node took part in, by outcome",
                                ["outcome"], registry=self.registry)
        self.hops = Counter("snakenode_hops_trained", "Hops this node trained", registry=self.registry)
        for p in ("decide", "negotiate", "transfer", "load"):
            self.phase.labels(p)
        for o in ("committed", "declined", "retry", "superseded"):
            self.outcomes.labels(o)
        self.node_id = node_id
        self._timings: dict[str, Timings] = {}
        self._cursor: dict[str, int] = {}

    def refresh(self) -> None:
        """Feed the hop-log records that appeared since the last refresh into the histograms."""
        for j in self.sources.jobs():
            job_id = str(j["job_id"])
            try:
                detail = self.sources.job(job_id, self._cursor.get(job_id, 0))
            except Exception:  # noqa: BLE001 - a job forgotten between the two calls
                continue
            self._cursor[job_id] = int(detail["total"])
            timings = self._timings.setdefault(job_id, Timings(self.node_id))
            for metric, label, value in timings.feed(detail["records"]):
                self._observe(metric, label, value)

    def _observe(self, metric: str, label: str, value: float) -> None:
        if metric == "phase":
            self.phase.labels(label).observe(value)
        elif metric == "train":
            self.train.observe(value)
            self.hops.inc()
        elif metric == "outcome":
            self.outcomes.labels(label).inc()

    def render(self) -> bytes:
        self.refresh()
        return generate_latest(self.registry)


def parse(text: str) -> dict[str, Any]:
    """{sample name: [(labels, value)...]} of a Prometheus text document (tests, benchmarks)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out
