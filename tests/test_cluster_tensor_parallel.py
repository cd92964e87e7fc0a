"""Tensor-parallel workers in the cluster (`tandem up --tensor-parallel-size 2`): each is one worker to the router
(one etcd record, one endpoint) and answers exactly as the engine alone; a rank SIGKILLed mid-burst takes its
worker out of routing within the lease, and the router's requests finish on the other worker, exactly."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal

import pytest

from tests.support.cluster import assert_pools_clean, fetch, metric, tandem_up, worker_metrics
from tests.support.cluster_workload import gather_limited, reference, run_grpc, workload

TTL = 2
AGGREGATED_TP2 = ("--prefill", "0", "--decode", "0", "--tensor-parallel-size", "2", "--dtype", "float32",
                  "--num-kv-blocks", "256", "--lease-ttl-s", str(TTL))


def rank_pids(worker_pid: int) -> list[int]:
    """The tensor-parallel rank processes a worker started (children of any of its threads)."""
    pids = []
    for task in pathlib.Path(f"/proc/{worker_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if b"engine.tp_follower" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
    return pids


def workers_listed(url: str) -> int:
    return int(json.loads(fetch(f"{url}/health"))["workers"])


@pytest.mark.slow
async def test_tensor_parallel_workers_serve_exactly_and_a_lost_rank_takes_its_worker_out(tiny_llama_dir) -> None:
    jobs = workload()
    expected = reference(str(tiny_llama_dir), jobs)
    with tandem_up("--both", "2", *AGGREGATED_TP2, "--model", str(tiny_llama_dir)) as cluster:
        workers = cluster.role("both")
        assert workers_listed(cluster.http_url) == 2  # two groups of two ranks: two workers
        ranks = {w.worker_id: rank_pids(w.pid) for w in workers}
        assert all(len(pids) == 1 for pids in ranks.values()), ranks
        got = await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs])
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"gRPC request {i} ({jobs[i].kind}, {len(jobs[i].ids)} ids)"
        await assert_pools_clean(cluster)

        # SIGKILL the second rank of one worker while a burst runs: its requests migrate to the other worker
        victim, survivor = workers
        burst = gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs])
        task = asyncio.ensure_future(burst)
        while metric(await asyncio.to_thread(worker_metrics, victim), "tandem_running_sequences") < 2:
            assert not task.done(), "the burst ended before the victim got busy"
            await asyncio.sleep(0.02)
        os.kill(ranks[victim.worker_id][0], signal.SIGKILL)
        got = await task
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"after the kill: gRPC request {i}"
        deadline = asyncio.get_running_loop().time() + 3 * TTL + 5
        while workers_listed(cluster.http_url) != 1:
            assert asyncio.get_running_loop().time() < deadline, "the broken worker is still routed to"
            await asyncio.sleep(0.1)
        cluster.workers.remove(victim)
        assert metric(worker_metrics(survivor), "tandem_generation_tokens_total") > 0
        await assert_pools_clean(cluster)


# (tandem up flags, the decode ranks each prefill rank must push to: {source rank: {decode ranks}}); the tiny Llama
# has 2 KV heads: at TP = 4 each is held by two prefill ranks and sent by one of them (decode rank d takes holder
# d mod 2: rank 0 for head 0 into decode rank 0, rank 3 for head 1 into decode rank 1). The TP = 2 decode group
# drafts with a self-int4 draft split as it is, over the KV pushed into its ranks; the TP = 2 prefill group keeps a
# second KV tier on each rank
MIXED = {"1P(TP=2)+1D(TP=1) tiered": (("--prefill-tensor-parallel-size", "2", "--kv-offload-gib", "0.02"),
                                     {0: {0}, 1: {0}}),
         "1P(TP=1)+1D(TP=2) self-int4": (("--decode-tensor-parallel-size", "2", "--speculative-model", "self-int4",
                                          "--speculative-adaptive", "false"), {0: {0, 1}}),
         "1P(TP=4)+1D(TP=2)": (("--prefill-tensor-parallel-size", "4", "--decode-tensor-parallel-size", "2"),
                               {0: {0}, 3: {1}})}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(MIXED))
async def test_prefill_and_decode_groups_of_different_degrees_move_kv_rank_to_rank(config, tiny_llama_dir) -> None:
    """Every output equals the engine alone; the remote path was taken; and each prefill rank pushed only its own
    KV heads, straight to the decode ranks holding them: equal bytes on every link, none through rank 0."""
    flags, links = MIXED[config]
    jobs = workload()
    expected = reference(str(tiny_llama_dir), jobs)
    with tandem_up("--prefill", "1", "--decode", "1", *flags, "--dtype", "float32", "--num-kv-blocks", "256",
                   "--min-remote-prefill-tokens", "8", "--model", str(tiny_llama_dir)) as cluster:
        got = await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs])
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"gRPC request {i} ({jobs[i].kind}, {len(jobs[i].ids)} ids)"
        decode, prefill = cluster.role("decode")[0], cluster.role("prefill")[0]
        assert metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote") > 0
        if "--kv-offload-gib" in flags:  # the prefill group's second tier took the blocks its requests left
            assert metric(worker_metrics(prefill), "tandem_kv_offload_blocks_total", op="store") > 0
        if "--speculative-model" in flags:
            assert metric(worker_metrics(decode), "tandem_spec_draft_tokens_total", result="accepted") > 0
        scraped = worker_metrics(prefill)
        pushed = {(s, d): metric(scraped, "tandem_kv_pushed_bytes_total", source_rank=str(s), dest_rank=str(d))
                  for s in range(4) for d in range(2)}
        sent = {link: total for link, total in pushed.items() if total}
        assert set(sent) == {(s, d) for s, dests in links.items() for d in dests}, pushed
        assert len(set(sent.values())) == 1, f"every link carries one KV head's pages alike: {sent}"
        await assert_pools_clean(cluster)


@pytest.mark.slow
async def test_a_rank_killed_mid_push_on_either_side_leaves_exact_answers_and_clean_pools(tiny_llama_dir) -> None:
    """1 prefill worker of 2 ranks, 2 decode workers of 2 ranks. A prefill rank past 0 SIGKILLed while prompts are
    pushed: the decode workers fall back to prefilling locally. Then a decode rank past 0 SIGKILLed while its worker
    decodes: the router migrates its requests to the other decode worker. Every answer stays exact."""
    bursts = [workload(count=16, seed=300 + i) for i in range(2)]
    expected = [reference(str(tiny_llama_dir), jobs) for jobs in bursts]
    with tandem_up("--prefill", "1", "--decode", "2", "--tensor-parallel-size", "2", "--dtype", "float32",
                   "--num-kv-blocks", "256", "--min-remote-prefill-tokens", "8", "--lease-ttl-s", str(TTL),
                   "--model", str(tiny_llama_dir)) as cluster:
        for jobs, want, victim in zip(bursts, expected, (cluster.role("prefill")[0], cluster.role("decode")[0]),
                                      strict=True):
            gauge = "tandem_running_sequences"
            task = asyncio.ensure_future(gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs]))
            while metric(await asyncio.to_thread(worker_metrics, victim), gauge) < 1:
                assert not task.done(), f"the burst ended before {victim.worker_id} got busy"
                await asyncio.sleep(0.01)
            os.kill(rank_pids(victim.pid)[0], signal.SIGKILL)
            got = await task
            for i, (g, e) in enumerate(zip(got, want, strict=True)):
                assert g == e, f"{victim.role} rank killed: gRPC request {i}"
            deadline = asyncio.get_running_loop().time() + 3 * TTL + 10
            while victim.pid in {w.pid for w in cluster.workers} and not _exited(victim.pid):
                assert asyncio.get_running_loop().time() < deadline, f"{victim.worker_id} outlived its rank"
                await asyncio.sleep(0.1)
            cluster.workers.remove(victim)
        survivor = cluster.role("decode")[0]
        assert metric(worker_metrics(survivor), "tandem_disaggregation_decisions_total", decision="fallback") > 0
        await assert_pools_clean(cluster)


def _exited(pid: int) -> bool:
    """The process is gone or a zombie (its parent, tandem up, reaps it later)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
