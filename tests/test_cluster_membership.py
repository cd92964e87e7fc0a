"""Workers come and go while the cluster serves: a worker started against the running cluster's
etcd takes traffic within 5 s of registering; a SIGKILLed worker leaves routing within its lease
TTL + 2 s, and requests keep succeeding throughout. A SIGKILLed prefill worker costs nothing but
a fallback: outputs stay exact. Each test runs on real and on simulated engines (engine.simulated)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.scrape import router_metrics
from common.processes import spawn
from tests.support.cluster import (
    REPO,
    Cluster,
    assert_pools_clean,
    fetch,
    metric,
    tandem_up,
    worker_metrics,
    worker_status,
)
from tests.support.cluster_workload import gather_limited, run_grpc, workload

TTL = 2


def _routed_to(cluster: Cluster, worker_id: str) -> float:
    return metric(router_metrics(cluster), "tandem_router_routed_total", pool="decode", worker=worker_id)


def _workers_seen(cluster: Cluster) -> int:
    """The router's count of workers (/health), checked against its counts by pool and its gauge."""
    import json
    health = json.loads(fetch(f"{cluster.http_url}/health"))
    text = router_metrics(cluster)
    assert health["pools"] == {pool: metric(text, "tandem_router_workers", pool=pool)
                               for pool in ("prefill", "decode", "both")}, health
    assert sum(health["pools"].values()) == health["workers"], health
    return health["workers"]


@pytest.mark.slow
async def test_worker_joins_and_a_killed_one_leaves(tiny_llama_engines) -> None:
    engines = tiny_llama_engines
    jobs = workload(count=4, seed=3)
    expected = engines.reference(jobs)
    with tandem_up("--prefill", "0", "--decode", "0", "--both", "1", *engines.args, "--lease-ttl-s", str(TTL),
                   "--policy", "round_robin") as cluster:
        late = spawn([sys.executable, "-m", "cluster.cli", "worker", "--role", "both", "--etcd", cluster.etcd,
                      *engines.args, "--lease-ttl-s", str(TTL), "--worker-id", "late"],
                     cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert late.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(late.stdout.readline), 120)
            assert line.startswith("READY late")
            registered = time.monotonic()
            while _routed_to(cluster, "late") == 0:
                assert time.monotonic() - registered < 5, "the new worker took no traffic within 5 s"
                assert await run_grpc(cluster.grpc_address, jobs[0]) == expected[0]
            os.kill(cluster.workers[0].pid, signal.SIGKILL)
            killed = time.monotonic()
            i = 0
            while _workers_seen(cluster) != 1:  # requests keep succeeding while the router still lists it
                assert time.monotonic() - killed < TTL + 2, "the killed worker stayed in routing"
                assert await run_grpc(cluster.grpc_address, jobs[i % 4]) == expected[i % 4]
                i += 1
            routed = _routed_to(cluster, "late")
            got = await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs])
            assert got == expected
            assert _routed_to(cluster, "late") - routed >= len(jobs)
        finally:
            late.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(late.wait, 60) == 0
            late.stdout.close()  # type: ignore[union-attr]


@pytest.mark.slow
async def test_a_killed_prefill_worker_costs_only_a_fallback(tiny_llama_engines) -> None:
    jobs = workload(count=12, seed=5)
    expected = tiny_llama_engines.reference(jobs)
    with tandem_up("--prefill", "2", "--decode", "1", *tiny_llama_engines.args, "--lease-ttl-s", str(TTL),
                   "--min-remote-prefill-tokens", "4", "--num-kv-blocks", "256") as cluster:
        assert await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs]) == expected
        victim = cluster.role("prefill")[0]
        os.kill(victim.pid, signal.SIGKILL)
        # at once, before its lease expires: the decode worker retries the other one, or prefills itself
        assert await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs]) == expected
        cluster.workers.remove(victim)
        decode = worker_metrics(cluster.role("decode")[0])
        assert metric(decode, "tandem_remote_prefill_failures_total", error="unavailable") > 0
        await assert_pools_clean(cluster)


@pytest.mark.slow
async def test_a_stalled_prefill_worker_is_waited_for_then_bypassed(tiny_llama_engines) -> None:
    """A SIGSTOPped prefill worker: each request waits --prefill-timeout-s, then the decode worker
    prefills it itself (exact output). The blocks the stalled worker might still write stay held
    until it is back and confirms the abort; then every pool is clean."""
    jobs = [j for j in workload(count=16, seed=9) if len(j.ids) >= 17][:3]
    expected = tiny_llama_engines.reference(jobs)
    with tandem_up("--prefill", "1", "--decode", "1", *tiny_llama_engines.args,
                   "--min-remote-prefill-tokens", "4", "--prefill-timeout-s", "2", "--num-kv-blocks", "256") as cluster:
        assert await run_grpc(cluster.grpc_address, jobs[0]) == expected[0]  # the transfer link is up
        prefill, decode = cluster.role("prefill")[0], cluster.role("decode")[0]
        os.kill(prefill.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs]) == expected
            assert time.monotonic() - started >= 2
            text = worker_metrics(decode)
            assert metric(text, "tandem_disaggregation_decisions_total", decision="fallback") == len(jobs)
            status = await worker_status(decode)
            assert status.pool_integrity_ok and status.running == 0
            assert status.free_blocks < status.total_blocks  # held for the stalled worker, not reused
        finally:
            os.kill(prefill.pid, signal.SIGCONT)
        await assert_pools_clean(cluster)
