"""Prometheus metrics of a worker process (one worker, or several simulated ones: every series is
labelled with its worker id)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.async_engine import AsyncEngine
from engine.outputs import SPEC_DECISIONS, EngineStats

PREFILL_TOKENS = Counter("tandem_prefill_tokens", "Prompt tokens prefilled here, by whether the prefix cache "
                         "served them (cached) or they were computed", ["worker", "kind"])
KV_PUSHED_BYTES = Counter("tandem_kv_pushed_bytes", "KV bytes a prefill worker's ranks pushed, by its rank and the "
                          "decode rank they went to (tensor-parallel groups: each rank sends its own KV heads)",
                          ["worker", "source_rank", "dest_rank"])
GENERATED_TOKENS = Counter("tandem_generation_tokens", "Tokens generated (streamed) by this worker", ["worker"])
WORKER_REQUESTS = Counter("tandem_worker_requests", "Requests ended on this worker, by RPC and outcome",
                          ["worker", "rpc", "outcome"])
DISAGGREGATION = Counter("tandem_disaggregation_decisions", "Where a decode worker prefilled a prompt: remote, "
                         "local_short, local_cached, local_no_prefill_worker, local_no_blocks, fallback "
                         "(after every remote prefill attempt failed), or local_resume (a migrated request)",
                         ["worker", "decision"])
REMOTE_PREFILL_FAILURES = Counter("tandem_remote_prefill_failures", "Remote prefill attempts that failed, by error",
                                  ["worker", "error"])
KV_STORE_BLOCKS = Counter("tandem_kv_store_blocks", "Blocks this worker moved with the cluster KV store, by op and "
                          "outcome: get (hit: read into the tier; miss: not in the store; corrupt: failed its "
                          "checksum; failed: the store erred or ran past the deadline), put (stored; present: the "
                          "store had it or was being given it; rejected at commit; failed)",
                          ["worker", "op", "outcome"])
KV_STORE_BYTES = Counter("tandem_kv_store_bytes", "Bytes of the blocks this worker read from (get) and wrote into "
                         "(put, once committed) the cluster KV store", ["worker", "op"])
KV_STORES_KNOWN = Gauge("tandem_kv_store_known", "1 for each cluster KV store this worker uses (read from etcd)",
                        ["worker", "store"])
KV_STORE_SECONDS = Histogram("tandem_kv_store_seconds", "Seconds of one exchange with the cluster KV store: a get "
                             "(lookup, read, checks) before a prompt is admitted, or a put (reserve, write, commit)",
                             ["worker", "op"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                        0.5, 1.0, 2.5))

REMOTE_PREFILL_SECONDS = Histogram(
    "tandem_remote_prefill_seconds", "Decode workers: seconds of a successful remote prefill, by phase: rpc (the "
    "Prefill call: the prompt computed and its KV pushed layer by layer meanwhile), kv_tail (after it returned, until "
    "every page and the final note had landed)", ["worker", "phase"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


class EngineCollector(Collector):
    """Gauges and the scheduler's counters of every engine added, read at scrape time (another thread). A
    process registers one (`ENGINES`): a process hosting several simulated workers labels each one's series."""

    def __init__(self) -> None:
        self._engines: dict[str, AsyncEngine] = {}

    def add(self, engine: AsyncEngine, worker_id: str) -> None:
        self._engines[worker_id] = engine

    def remove(self, engine: AsyncEngine, worker_id: str) -> None:
        if self._engines.get(worker_id) is engine:  # not a later engine served under the same id
            del self._engines[worker_id]

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engines = [(worker_id, engine.stats()) for worker_id, engine in list(self._engines.items())]
        for name, doc, field in (
                ("tandem_running_sequences", "Sequences in the running batch", "running"),
                ("tandem_waiting_sequences", "Sequences waiting to be scheduled", "waiting"),
                ("tandem_remote_kv_waiting_sequences", "Sequences parked until their remote prefill lands",
                 "waiting_for_remote_kv"),
                ("tandem_kv_cache_usage_ratio", "Share of KV blocks in use", "kv_usage"),
                ("tandem_kv_free_blocks", "KV blocks free (including evictable cached ones)", "free_blocks")):
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            for worker_id, stats in engines:
                family.add_metric([worker_id], getattr(stats, field))
            yield family
        preemptions = CounterMetricFamily("tandem_preemptions", "Running sequences preempted (their KV blocks "
                                          "freed, to be recomputed) to make room in the KV cache", labels=["worker"])
        for worker_id, stats in engines:
            preemptions.add_metric([worker_id], stats.preemptions_total)
        yield preemptions
        yield from _prefix_cache_families(engines)
        yield from _speculation_families(engines)


def _speculation_families(engines: list[tuple[str, EngineStats]]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Draft-model speculation (engine.spec_control): drafts, decisions, acceptance, the chosen length."""
    drafts = CounterMetricFamily("tandem_spec_draft_tokens", "Draft tokens the draft model proposed, and of those "
                                 "the target accepted", labels=["worker", "result"])
    steps = CounterMetricFamily("tandem_spec_steps", "Steps with sequences that could speculate, by decision: on "
                                "(predicted to raise tokens/s), probe (measuring what is not known yet), off",
                                labels=["worker", "decision"])
    acceptance = GaugeMetricFamily("tandem_spec_acceptance_ratio", "Moving average of accepted / proposed drafts",
                                   labels=["worker"])
    length = GaugeMetricFamily("tandem_spec_draft_length", "Drafts per sequence in the last step (0: off)",
                               labels=["worker"])
    gain = GaugeMetricFamily("tandem_spec_predicted_gain", "Tokens/s the last decision predicted over not "
                             "speculating (1: off or measuring)", labels=["worker"])
    for worker_id, stats in engines:
        spec = stats.spec
        if spec is None:
            continue
        drafts.add_metric([worker_id, "proposed"], spec.draft_tokens_proposed)
        drafts.add_metric([worker_id, "accepted"], spec.draft_tokens_accepted)
        for decision in SPEC_DECISIONS:
            steps.add_metric([worker_id, decision], spec.steps.get(decision, 0))
        acceptance.add_metric([worker_id], spec.acceptance)
        length.add_metric([worker_id], spec.draft_length)
        gain.add_metric([worker_id], spec.predicted_gain)
    yield from (drafts, steps, acceptance, length, gain)


def _prefix_cache_families(engines: list[tuple[str, EngineStats]]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Prefix-cache lookups by tier, and the second tier's traffic, capacity and evictions."""
    lookups = CounterMetricFamily("tandem_prefix_cache_blocks", "Full prompt blocks looked up in a KV tier, by tier "
                                  "(pool, then offload for the pool's misses) and result (hit or miss)",
                                  labels=["worker", "tier", "result"])
    blocks = CounterMetricFamily("tandem_kv_offload_blocks", "Blocks the second KV tier stored, loaded back into "
                                 "the pool, evicted for room, or dropped (no room)", labels=["worker", "op"])
    transfer_bytes = CounterMetricFamily("tandem_kv_offload_bytes", "Bytes copied into (store) and out of (load) "
                                         "the second KV tier", labels=["worker", "op"])
    seconds = CounterMetricFamily("tandem_kv_offload_seconds", "Seconds spent copying into (store, on the tier's "
                                  "writer thread) and out of (load, on the engine's) the second KV tier",
                                  labels=["worker", "op"])
    capacity = GaugeMetricFamily("tandem_kv_offload_capacity_blocks", "Blocks the second KV tier holds at most",
                                 labels=["worker"])
    used = GaugeMetricFamily("tandem_kv_offload_used_blocks", "Blocks in the second KV tier", labels=["worker"])
    for worker_id, stats in engines:
        lookups.add_metric([worker_id, "pool", "hit"], stats.prefix_hit_blocks)
        lookups.add_metric([worker_id, "pool", "miss"], stats.prefix_queried_blocks - stats.prefix_hit_blocks)
        tier = stats.offload
        if tier is None:
            continue
        lookups.add_metric([worker_id, "offload", "hit"], tier.loaded_blocks)
        lookups.add_metric([worker_id, "offload", "miss"], tier.queried_blocks - tier.loaded_blocks)
        for op, count in (("store", tier.stored_blocks), ("load", tier.loaded_blocks),
                          ("evict", tier.evicted_blocks), ("drop", tier.dropped_blocks)):
            blocks.add_metric([worker_id, op], count)
        for op, count, spent in (("store", tier.stored_blocks, tier.store_seconds),
                                 ("load", tier.loaded_blocks, tier.load_seconds)):
            transfer_bytes.add_metric([worker_id, op], count * tier.block_bytes)
            seconds.add_metric([worker_id, op], spent)
        capacity.add_metric([worker_id], tier.capacity_blocks)
        used.add_metric([worker_id], tier.used_blocks)
    yield from (lookups, blocks, transfer_bytes, seconds, capacity, used)


ENGINES = EngineCollector()  # the process's: worker_runtime.server adds each engine it serves
REGISTRY.register(ENGINES)
