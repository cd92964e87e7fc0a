"""The worker's engine metrics read at scrape time (worker_runtime/metrics.py), here the preemption
counter: a KV cache too small for the batch preempts sequences, and /metrics says how many."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from bench.scrape import metric
from engine import AsyncEngine, SamplingParams
from engine.config import EngineConfig
from worker_runtime.metrics import EngineCollector


async def test_preemptions_are_counted(tiny_llama_dir) -> None:
    # 12 blocks of 16 tokens cannot hold four 60-token prompts growing by 40 tokens each at once
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=12, max_num_batched_tokens=24,
                                      max_model_len=190, dtype="float32"))
    registry = CollectorRegistry()
    collector = EngineCollector()
    collector.add(engine, "w-1")
    registry.register(collector)
    try:
        assert metric(generate_latest(registry).decode(), "tandem_preemptions_total", worker="w-1") == 0
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        prompts = [[(5 * i + j) % 500 + 3 for j in range(60)] for i in range(4)]
        await asyncio.gather(*(engine.generate(engine.make_request(f"r{i}", p, params)) for i, p in enumerate(prompts)))
        preempted = engine.stats().preemptions_total
        assert preempted > 0
        assert metric(generate_latest(registry).decode(), "tandem_preemptions_total", worker="w-1") == preempted
    finally:
        engine.shutdown()
