"""Request migration: a decode worker SIGKILLed mid-stream. The router moves each of its streams (prompt +
tokens already streamed) to another decode worker; the client's stream goes on with no token repeated or
lost, and the greedy text equals an undisturbed run (cluster/router_core.py, decode_worker/servicer.py)."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from bench.scrape import router_metrics
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.cluster_workload import Job, reference

STREAMS = 4
MAX_TOKENS = 200  # the tiny model's context is 256
KILL_AFTER = 3  # tokens every stream has received when the decode worker dies


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "deterministic"), [("float32", False), ("bfloat16", True)])
async def test_streams_of_a_killed_decode_worker_go_on_elsewhere_exactly(tiny_llama_dir, dtype: str,
                                                                         deterministic: bool) -> None:
    """In bf16 the survivor recomputes prompt + streamed tokens as one prefill, where the victim had
    decoded them one by one amid other streams: only --deterministic (batch invariance, and one
    attention kernel for prefill and decode) makes the resumed stream exact there."""
    jobs = [Job("ids", ids=tuple((11 * i + 7 * s) % 400 + 5 for i in range(20 + s)), max_tokens=MAX_TOKENS)
            for s in range(STREAMS)]
    expected = reference(str(tiny_llama_dir), jobs, dtype=dtype, deterministic=deterministic)
    with tandem_up("--prefill", "1", "--decode", "2", "--model", str(tiny_llama_dir), "--dtype", dtype,
                   "--deterministic", str(deterministic).lower(), "--min-remote-prefill-tokens", "4",
                   "--policy", "round_robin", "--num-kv-blocks", "256") as cluster:
        victim = cluster.role("decode")[0]
        received: list[list[int]] = [[] for _ in jobs]
        texts = ["" for _ in jobs]
        reasons: list[int] = [0 for _ in jobs]
        all_started = asyncio.Event()

        async def consume(i: int, stub: inference_pb2_grpc.InferenceStub) -> None:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=jobs[i].ids), sampling=pb.SamplingParameters(
                temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
            async for chunk in stub.Generate(request, timeout=120):
                received[i] += chunk.token_ids
                texts[i] += chunk.text
                reasons[i] = chunk.finish_reason or reasons[i]
                if all(len(r) >= KILL_AFTER for r in received):
                    all_started.set()

        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            streams = [asyncio.create_task(consume(i, stub)) for i in range(STREAMS)]
            await asyncio.wait_for(all_started.wait(), 60)
            os.kill(victim.pid, signal.SIGKILL)
            cut = [len(r) for r in received]
            await asyncio.wait_for(asyncio.gather(*streams), 120)

        assert all(c < MAX_TOKENS for c in cut), f"streams finished before the kill: {cut}"
        for i, want in enumerate(expected):
            assert tuple(received[i]) == want.token_ids, f"stream {i} (cut at {cut[i]} tokens)"
            assert texts[i] == want.text, f"stream {i}"
            assert reasons[i] == pb.FINISH_REASON_LENGTH
        migrated = metric(router_metrics(cluster), "tandem_router_migrations_total", error="unavailable")
        assert migrated >= 1, "no stream was on the killed decode worker"
        cluster.workers.remove(victim)
        survivor = worker_metrics(cluster.role("decode")[0])
        assert metric(survivor, "tandem_disaggregation_decisions_total", decision="local_resume") == migrated
        await assert_pools_clean(cluster)
