"""Prometheus metrics of one app, on a registry of its own (several apps may share a process).

Beside smartmixed's own families, Triton's ``nv_inference_*`` families with its names, labels
(model, version) and units (counts; durations as microseconds summed), read from the
statistics store (statistics.py) when scraped: the numbers of ``/v2/models/stats`` exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from smartmixed.serve.server import ConnectionStats
from smartmixed.serve.statistics import Statistics

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CLIENT_CLOSED = "client_closed"  # the status label of a request whose client went away


class Metrics:
    def __init__(self, connections: ConnectionStats | None = None) -> None:
        self.registry = CollectorRegistry()
        counter = partial(Counter, registry=self.registry)
        seconds = partial(Histogram, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = counter(
            "smartmixed_requests",
            "Requests by model, endpoint and status (client_closed: the "
            "client went away before the answer)",
            ["model", "endpoint", "status"],
        )
        self.latency = seconds(
            "smartmixed_request_seconds",
            "Request latency, end to end in the handler",
            ["model", "endpoint"],
        )
        self.queue_wait = seconds(
            "smartmixed_queue_wait_seconds", "Wait in the dynamic-batching queue", ["model"]
        )
        self.inference = seconds(
            "smartmixed_inference_seconds", "ONNX Runtime run time per batch", ["model"]
        )
        self.batch_size = Histogram(
            "smartmixed_batch_rows",
            "Rows per ONNX Runtime run",
            ["model"],
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.shed = counter(
            "smartmixed_shed",
            "Inference requests answered 503 by load shedding, by reason "
            "(queue_full: refused on arrival; deadline: dropped after request_timeout_s)",
            ["model", "reason"],
        )
        self.in_flight: dict[str, int] = {}  # model -> admitted requests; read when scraped
        self.registry.register(_InFlightCollector(self.in_flight))
        if connections is not None:
            self.registry.register(_ConnectionCollector(connections))
        self.stats = Statistics()  # Triton's statistics extension; nv_* below
        self.registry.register(_TritonCollector(self.stats))
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, cached: the labels are model names, endpoints and
        statuses (bounded), and prometheus_client's lookup costs microseconds per call."""
        key = (metric._name, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class _InFlightCollector:
    def __init__(self, in_flight: dict[str, int]) -> None:
        self.in_flight = in_flight

    def collect(self):
        family = GaugeMetricFamily(
            "smartmixed_in_flight",
            "Inference requests admitted and not yet answered",
            labels=["model"],
        )
        for model, count in sorted(self.in_flight.items()):
            family.add_metric([model], count)
        yield family


class _ConnectionCollector:
    """Connections the HTTP protocol cut, by reason (counted there, exported here)."""

    def __init__(self, stats: ConnectionStats) -> None:
        self.stats = stats

    def collect(self):
        family = CounterMetricFamily(
            "smartmixed_connections_cut",
            "Connections closed by a server limit (header size or timeout, body timeout, "
            "connection cap, invalid HTTP)",
            labels=["reason"],
        )
        for reason, count in sorted(self.stats.cut.items()):
            family.add_metric([reason], count)
        yield family


# Triton's families: (name, help, what of a VersionStatistics; durations ns -> us)
TRITON_FAMILIES = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda v: v.durations["success"].count,
    ),
    (
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        lambda v: v.durations["fail"].count,
    ),
    ("nv_inference_count", "Number of inferences performed (rows)", lambda v: v.inference_count),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (a merged batch is one)",
        lambda v: v.execution_count,
    ),
    *(
        (f"nv_inference_{name}_duration_us", text, lambda v, key=key: v.durations[key].ns // 1000)
        for name, key, text in (
            (
                "request",
                "success",
                "Cumulative inference request duration in microseconds (successful requests)",
            ),
            ("queue", "queue", "Cumulative inference queuing duration in microseconds"),
            (
                "compute_input",
                "compute_input",
                "Cumulative compute input duration in microseconds (request decoding)",
            ),
            (
                "compute_infer",
                "compute_infer",
                "Cumulative compute inference duration in microseconds",
            ),
            (
                "compute_output",
                "compute_output",
                "Cumulative inference compute output duration in microseconds (answer encoding)",
            ),
        )
    ),
)


class _TritonCollector:
    """Triton's nv_inference_* counters of each model version served.

    Exported untyped: prometheus_client writes a counter family as NAME_total, and dashboards
    made for Triton query the names without the suffix. The values only grow while a version is
    served (they go with it when it is unloaded).
    """

    def __init__(self, stats: Statistics) -> None:
        self.stats = stats

    def collect(self):
        versions = sorted(self.stats.versions.items())
        for name, documentation, value in TRITON_FAMILIES:
            family = Metric(name, documentation, "unknown")
            for (model, version), stats in versions:
                family.add_sample(name, {"model": model, "version": version}, value(stats))
            yield family
