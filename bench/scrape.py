"""Reading Prometheus /metrics of a running cluster (benchmarks and tests)."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families

from cluster.up_events import WorkerUp
from cluster.up_process import LocalCluster


def fetch(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as reply:
        return reply.read().decode()


def _samples(text: str, name: str, labels: dict[str, str]) -> Iterator[float]:
    """Values of the samples called `name` (e.g. `tandem_x_total`) whose labels include `labels`."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                yield float(sample.value)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the first matching sample (0 if none)."""
    return next(_samples(text, name, labels), 0.0)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every matching sample."""
    return sum(_samples(text, name, labels))


def worker_metrics(worker: WorkerUp) -> str:
    return fetch(f"http://127.0.0.1:{worker.metrics_port}/metrics")


def router_metrics(cluster: LocalCluster, context: ssl.SSLContext | None = None) -> str:
    return fetch(f"{cluster.http_url}/metrics", context)
