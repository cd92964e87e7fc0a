"""Prometheus metrics of a worker process (one worker per process; every series is labelled with
its worker id)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.async_engine import AsyncEngine

PREFILL_TOKENS = Counter("tandem_prefill_tokens", "Prompt tokens prefilled here, by whether the prefix cache "
                         "served them (cached) or they were computed", ["worker", "kind"])
GENERATED_TOKENS = Counter("tandem_generation_tokens", "Tokens generated (streamed) by this worker", ["worker"])
WORKER_REQUESTS = Counter("tandem_worker_requests", "Requests ended on this worker, by RPC and outcome",
                          ["worker", "rpc", "outcome"])
DISAGGREGATION = Counter("tandem_disaggregation_decisions", "Where a decode worker prefilled a prompt: remote, "
                         "local_short, local_cached, local_no_prefill_worker, local_no_blocks, fallback "
                         "(after every remote prefill attempt failed), or local_resume (a migrated request)",
                         ["worker", "decision"])
REMOTE_PREFILL_FAILURES = Counter("tandem_remote_prefill_failures", "Remote prefill attempts that failed, by error",
                                  ["worker", "error"])


class EngineCollector(Collector):
    """Gauges and the scheduler's counters, read from the engine at scrape time (another thread)."""

    def __init__(self, engine: AsyncEngine, worker_id: str) -> None:
        self.engine, self.worker_id = engine, worker_id

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.stats()
        for name, doc, value in (
                ("tandem_running_sequences", "Sequences in the running batch", stats.running),
                ("tandem_waiting_sequences", "Sequences waiting to be scheduled", stats.waiting),
                ("tandem_remote_kv_waiting_sequences", "Sequences parked until their remote prefill lands",
                 stats.waiting_for_remote_kv),
                ("tandem_kv_cache_usage_ratio", "Share of KV blocks in use", stats.kv_usage),
                ("tandem_kv_free_blocks", "KV blocks free (including evictable cached ones)", stats.free_blocks)):
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            family.add_metric([self.worker_id], value)
            yield family
        preemptions = CounterMetricFamily("tandem_preemptions", "Running sequences preempted (their KV blocks "
                                          "freed, to be recomputed) to make room in the KV cache", labels=["worker"])
        preemptions.add_metric([self.worker_id], stats.preemptions_total)
        yield preemptions
