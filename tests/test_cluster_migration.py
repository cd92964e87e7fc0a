"""Request migration, on real and on simulated workers: a decode worker SIGKILLed mid-stream. The router
moves each of its streams (prompt + tokens already streamed) to another decode worker; the client's
stream goes on with no token repeated or lost, and the greedy text equals an undisturbed run
(cluster/router_core.py, decode_worker/servicer.py)."""

from __future__ import annotations

import pytest

from bench.scrape import router_metrics
from tandem.v1 import inference_pb2 as pb
from tests.support.cluster import Cluster, assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.cluster_workload import Expected, Job, reference
from tests.support.migration import stream_through_kill
from tests.support.simulation import Engines, write_profile

STREAMS = 4
MAX_TOKENS = 200  # the tiny model's context is 256
KILL_AFTER = 3  # tokens every stream has received when the decode worker dies
# simulated decode steps of ~30 ms: 60 tokens take ~2 s, time enough to kill a worker 3 tokens in
MIGRATION_DECODE = [[1, 0.03], [8, 0.035], [64, 0.06]]
SIMULATED_TOKENS = 60


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
        await _kill_a_decode_worker_mid_stream(cluster, jobs, expected)


@pytest.mark.slow
async def test_streams_of_a_killed_simulated_decode_worker_go_on_elsewhere_exactly(tiny_llama_dir,
                                                                                   tmp_path) -> None:
    """The same on simulated workers (engine.simulated): the survivor's simulated model continues each
    stream exactly where the victim's left it (the deterministic model is a function of the context)."""
    engines = Engines(tiny_llama_dir, write_profile(tmp_path, tiny_llama_dir, decode=MIGRATION_DECODE))
    jobs = [Job("ids", ids=tuple((13 * i + 5 * s) % 400 + 5 for i in range(20 + s)), max_tokens=SIMULATED_TOKENS)
            for s in range(STREAMS)]
    with tandem_up("--prefill", "1", "--decode", "2", *engines.args, "--min-remote-prefill-tokens", "4",
                   "--policy", "round_robin", "--num-kv-blocks", "256") as cluster:
        await _kill_a_decode_worker_mid_stream(cluster, jobs, engines.reference(jobs))


async def _kill_a_decode_worker_mid_stream(cluster: Cluster, jobs: list[Job], expected: list[Expected]) -> None:
    """SIGKILL the first decode worker once every stream has KILL_AFTER tokens: each stream ends as
    `expected` (ids, text, length), each of the victim's streams was resumed on the survivor."""
    victim = cluster.role("decode")[0]
    requests = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=job.ids), sampling=pb.SamplingParameters(
        temperature=0.0, max_tokens=job.max_tokens, ignore_eos=True)) for job in jobs]
    received = await stream_through_kill(cluster.grpc_address, requests, victim.pid, KILL_AFTER)

    assert all(r.cut < job.max_tokens for r, job in zip(received, jobs, strict=True)), \
        f"streams finished before the kill: {received}"
    for i, (got, want) in enumerate(zip(received, expected, strict=True)):
        assert tuple(got.token_ids) == want.token_ids, f"stream {i} (cut at {got.cut} tokens)"
        assert got.text == want.text, f"stream {i}"
        assert got.finish_reason == pb.FINISH_REASON_LENGTH
    migrated = metric(router_metrics(cluster), "tandem_router_migrations_total", error="unavailable")
    assert migrated >= 1, "no stream was on the killed decode worker"
    cluster.workers.remove(victim)
    survivor = worker_metrics(cluster.role("decode")[0])
    assert metric(survivor, "tandem_disaggregation_decisions_total", decision="local_resume") == migrated
    await assert_pools_clean(cluster)
