"""KV-aware routing across two prefill workers: a prompt sharing a long prefix with an earlier one
goes to the prefill worker whose cache holds it, which computes only the new tokens; a prompt the
decode worker itself already holds (but for a few tokens) is prefilled there (conditional
disaggregation); a request for prompt logprobs is credited no cached block. Checked through the
router's and the workers' metrics."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from bench.scrape import router_metrics
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import Cluster, assert_pools_clean, metric, tandem_up, worker_metrics

BLOCK = 16


async def _generate(cluster: Cluster, ids: list[int], prompt_logprobs: int | None = None) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(
        temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=prompt_logprobs))
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        return [t async for c in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
                for t in c.token_ids]


def _routed(cluster: Cluster) -> dict[str, float]:
    text = router_metrics(cluster)
    return {p.worker_id: metric(text, "tandem_router_routed_total", pool="prefill", worker=p.worker_id)
            for p in cluster.role("prefill")}


def _computed(worker) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    text = worker_metrics(worker)
    return (metric(text, "tandem_prefill_tokens_total", kind="computed"),
            metric(text, "tandem_prefill_tokens_total", kind="cached"))


async def _until_router_sees(cluster: Cluster, worker_id: str, blocks: int, where: str = "cached") -> None:
    """Until the router knows `blocks` blocks of the worker's prefix cache (`cached`) or second tier (`offloaded`)."""
    for _ in range(200):
        if metric(router_metrics(cluster), f"tandem_router_worker_{where}_blocks", worker=worker_id) >= blocks:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the router never saw {blocks} {where} blocks on {worker_id}")


@pytest.mark.slow
async def test_shared_prefix_goes_to_the_prefill_worker_holding_it(tiny_llama_dir) -> None:
    rng = random.Random(7)
    with tandem_up("--prefill", "2", "--decode", "1", "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--num-kv-blocks", "256", "--min-remote-prefill-tokens", "16") as cluster:
        prefix = [rng.randrange(4, 512) for _ in range(10 * BLOCK)]  # 160 tokens: 10 full blocks
        before = _routed(cluster)
        await _generate(cluster, prefix)
        after = _routed(cluster)
        holder = next(w for w in after if after[w] > before[w])
        await _until_router_sees(cluster, holder, 10)

        for round_ in range(3):  # every time to the holder, whatever the round-robin tie-break would say
            worker = next(p for p in cluster.role("prefill") if p.worker_id == holder)
            computed0, cached0 = _computed(worker)
            new = [rng.randrange(4, 512) for _ in range(30)]
            before = _routed(cluster)
            await _generate(cluster, prefix[:9 * BLOCK] + new)  # shares 9 blocks with the first prompt
            after = _routed(cluster)
            assert {w: after[w] - before[w] for w in after} == {w: float(w == holder) for w in after}, round_
            computed1, cached1 = _computed(worker)
            assert (computed1 - computed0, cached1 - cached0) == (30, 9 * BLOCK), round_

        decode = cluster.role("decode")[0]
        local0 = metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="local_cached")
        await _generate(cluster, [*prefix, 5, 6, 7])  # the decode worker holds the 160-token prefix itself
        local1 = metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="local_cached")
        assert local1 - local0 == 1

        # prompt logprobs are computed over the whole prompt: the router credits no cached block for them
        overlap = [metric(router_metrics(cluster), "tandem_router_prefix_overlap_blocks_total", worker=w)
                   for w in (holder, decode.worker_id)]
        assert overlap[0] >= 3 * 9  # the rounds above were credited
        await _generate(cluster, prefix[:9 * BLOCK] + [7] * 20, prompt_logprobs=1)
        assert overlap == [metric(router_metrics(cluster), "tandem_router_prefix_overlap_blocks_total", worker=w)
                           for w in (holder, decode.worker_id)]
        await assert_pools_clean(cluster)



@pytest.mark.slow
async def test_a_prefix_in_a_workers_second_tier_draws_the_request_there(tiny_llama_dir) -> None:
    """Two aggregated workers with small pools and a second KV tier. A prompt's blocks leave its worker's pool
    for that worker's tier (other prompts evict them); the router learns it from the worker's KV events, and a
    prompt sharing the prefix goes to that worker, which loads the blocks instead of computing them."""
    rng = random.Random(11)
    with tandem_up("--both", "2", "--prefill", "0", "--decode", "0", "--model", str(tiny_llama_dir),
                   "--dtype", "float32", "--num-kv-blocks", "24", "--kv-offload-gib", "0.002") as cluster:
        workers = {w.worker_id: w for w in cluster.role("both")}

        def routed() -> dict[str, float]:
            text = router_metrics(cluster)
            return {w: metric(text, "tandem_router_routed_total", pool="decode", worker=w) for w in workers}

        prefix = [rng.randrange(4, 512) for _ in range(10 * BLOCK)]
        before = routed()
        await _generate(cluster, prefix)
        holder = next(w for w, n in routed().items() if n > before[w])
        for _ in range(4):  # 12-block prompts, to both workers in turn: the holder's pool (24 blocks) evicts the prefix
            await _generate(cluster, [rng.randrange(4, 512) for _ in range(12 * BLOCK)])
        await _until_router_sees(cluster, holder, 10, where="offloaded")

        computed0, cached0 = _computed(workers[holder])
        loads0 = metric(worker_metrics(workers[holder]), "tandem_kv_offload_blocks_total", op="load")
        overlap0 = metric(router_metrics(cluster), "tandem_router_prefix_overlap_blocks_total", worker=holder)
        before = routed()
        await _generate(cluster, prefix[:9 * BLOCK] + [rng.randrange(4, 512) for _ in range(30)])
        after = routed()
        assert {w: after[w] - before[w] for w in after} == {w: float(w == holder) for w in after}
        assert metric(router_metrics(cluster), "tandem_router_prefix_overlap_blocks_total", worker=holder) \
            - overlap0 == 9
        computed1, cached1 = _computed(workers[holder])
        assert (computed1 - computed0, cached1 - cached0) == (30, 9 * BLOCK)  # loaded from the tier, not computed
        loads = metric(worker_metrics(workers[holder]), "tandem_kv_offload_blocks_total", op="load") - loads0
        assert loads == 9  # the prefix had left the pool: every block of it came from the tier
        await assert_pools_clean(cluster)
