"""200 simulated workers (100 prefill, 100 decode, in four fleet processes) behind the real router and
etcd: the router sees every one, a bounded load is answered exactly (the simulated model's tokens) and
spread over many workers, and the fleets drain cleanly. The 1000-worker runs are bench.sim_scale's."""

from __future__ import annotations

import asyncio
import random

import pytest

from bench.scrape import metric
from bench.sim_cluster import sim_cluster
from tests.support.cluster_workload import Job, gather_limited, run_grpc
from tests.support.simulation import expected_of, write_profile


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_two_hundred_simulated_workers_serve_a_load_exactly(tiny_llama_dir, tmp_path) -> None:
    profile = write_profile(tmp_path, tiny_llama_dir)
    vocab = 512
    rng = random.Random(5)
    jobs = [Job("ids", ids=tuple(rng.randrange(4, vocab) for _ in range(rng.choice([4, 40, 90]))),
                max_tokens=rng.randint(1, 12)) for _ in range(120)]
    with sim_cluster(str(profile), prefill=100, decode=100, per_process=50, model=str(tiny_llama_dir),
                     worker_args=("--num-kv-blocks", "256", "--min-remote-prefill-tokens", "32")) as cluster:
        assert len(cluster.workers["prefill"]) == len(cluster.workers["decode"]) == 100
        for _ in range(100):  # every record reached the router's view
            if cluster.seen("prefill") == cluster.seen("decode") == 100:
                break
            await asyncio.sleep(0.3)
        assert cluster.seen("prefill") == cluster.seen("decode") == 100
        got = await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs], 16)
        assert [g.token_ids for g in got] == [tuple(expected_of(tiny_llama_dir, list(j.ids), j.max_tokens))
                                             for j in jobs]
        text = cluster.router_metrics()
        for pool, least in (("decode", 30), ("prefill", 10)):  # long prompts prefill remotely
            used = [w for w in cluster.workers[pool] if metric(text, "tandem_router_routed_total", pool=pool, worker=w)]
            assert len(used) >= least, f"only {len(used)} {pool} workers got requests"
    assert all(proc.returncode == 0 for proc in cluster.fleets), [proc.returncode for proc in cluster.fleets]
