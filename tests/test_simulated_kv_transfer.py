"""A simulated prefill worker's KV push takes the profile's link time for the real model's KV bytes
(engine.simulated: SimulationProfile.kv_push_seconds, waited by the runner before the step commits): the
arithmetic on the runner's own clock, and through a real 1P+1D cluster, the decode side's first token late by
about the modelled time."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from cluster.up_process import LocalCluster
from engine import LLM, SamplingParams
from engine.simulated.profile import SimulationProfile
from engine.simulated.runner import SimulatedRunner
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.simulation import write_profile


def test_the_push_overlaps_the_compute_and_pays_what_the_link_cannot_hide(tiny_llama_dir, tmp_path) -> None:
    profile = SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, kv_s_per_byte=1e-5,
                                                   kv_transfer_latency_s=0.001))
    # 2 layers over 20 ms: layer 0 done at 10 ms, layer 1 at 20 ms
    assert profile.kv_push_seconds(0.02, 2, 100) == pytest.approx(0.02 + 0.001 + 0.001)  # the link keeps up
    assert profile.kv_push_seconds(0.02, 2, 5000) == pytest.approx(0.01 + 2 * 0.05 + 0.001)  # link-bound
    assert profile.kv_push_seconds(0.02, 2, 0) == 0.02  # nothing pushed: no latency either
    assert profile.slowed(3).kv_push_seconds(0.06, 2, 5000) == pytest.approx(3 * (0.01 + 2 * 0.05 + 0.001))
    # profiles written before the transfer model (docs/benchmarks) load, and model none
    old = SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir))
    assert not old.models_kv_transfer and old.kv_push_seconds(0.02, 2, 10**9) == 0.02
    with pytest.raises(ValueError, match="kv_s_per_byte"):
        SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, kv_s_per_byte=-1.0))
    assert json.loads(profile.to_json())["kv_s_per_byte"] == 1e-5


def test_a_pushing_step_is_held_for_the_real_kvs_bytes_on_the_runners_clock(tiny_llama_dir, tmp_path) -> None:
    """The tiny Llama (2 layers, 2 KV heads of 16) in bf16 moves 2 x 2 x 16 x 2 = 128 bytes per token per layer
    in whole blocks of 4 tokens: a 100-token prompt 25 blocks, a decode step none (the decode side holds the
    prompt's blocks only); the same prompt again, served from the prefix cache, still pushes all 25 (the
    decode side holds none of them)."""
    llm = LLM(str(tiny_llama_dir), simulate=str(write_profile(tmp_path, tiny_llama_dir, kv_s_per_byte=1e-6,
                                                               kv_transfer_latency_s=0.001)),
              num_kv_blocks=64, block_size=4)
    runner = llm.engine.runner
    assert isinstance(runner, SimulatedRunner) and runner.real_kv is not None
    assert runner.real_kv.bytes_per_token_per_layer == 2 * 2 * 16 * 2
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    runner.clock, runner.sleep = (lambda: now[0]), sleep
    runner.layer_observer = lambda layer, ready: None  # as a KV push hook does on a prefill worker
    profile = runner.profile

    def held(step_s: float, blocks: int) -> float:  # the closed form: max(T + t, T / L + L t) + latency
        t = blocks * 4 * 128 * 1e-6
        return max(step_s + t, step_s / 2 + 2 * t) + 0.001

    llm.generate([[7] * 100], SamplingParams(temperature=0, max_tokens=2))
    prefill = profile.step_seconds(100, 0, 0)
    assert held(prefill, 25) > prefill + 0.02  # link-bound: 12.8 ms a layer against 8.3 ms of compute
    assert now[0] == pytest.approx(held(prefill, 25) + profile.step_seconds(0, 1, 101))
    now[0] = 0.0
    again = llm.generate([[7] * 100], SamplingParams(temperature=0, max_tokens=1))[0]
    assert again.num_cached_tokens == 96
    assert now[0] == pytest.approx(held(profile.step_seconds(4, 0, 0), 25))
    # no hook watching (a decode worker, an aggregated one): no transfer, no wait
    runner.layer_observer = None
    now[0] = 0.0
    llm.generate([[8] * 100], SamplingParams(temperature=0, max_tokens=1))
    assert now[0] == pytest.approx(profile.step_seconds(100, 0, 0))


async def _first_token_seconds(cluster: LocalCluster, prompt: list[int]) -> float:
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(temperature=0.0, max_tokens=2), timeout_seconds=60)
    request.token_ids.ids.extend(prompt)
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        started = time.monotonic()
        async for chunk in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60):
            if chunk.token_ids:
                return time.monotonic() - started
    raise AssertionError("no token")


async def test_a_slow_link_delays_the_decode_sides_first_token_by_the_modelled_time(tiny_llama_dir, tmp_path) -> None:
    """1P+1D simulated workers over the real router, etcd and KV transfer path, the link 28 us per byte: a
    200-token prompt's real KV (13 blocks of 16 tokens x 128 bytes a layer, bf16) takes ~1.5 s to push, and
    the first token streams no sooner, and not much later."""
    s_per_byte = 28e-6
    path = write_profile(tmp_path, tiny_llama_dir, kv_s_per_byte=s_per_byte)
    profile = SimulationProfile.load(path)
    modelled = profile.kv_push_seconds(profile.step_seconds(200, 0, 0), 2, 13 * 16 * 128)
    assert 1.4 < modelled < 1.7
    with tandem_up("--simulate", str(path), "--model", str(tiny_llama_dir), "--num-kv-blocks", "512",
                   "--min-remote-prefill-tokens", "8", "--prefill", "1", "--decode", "1") as cluster:
        await _first_token_seconds(cluster, [40] * 10)  # connections up (a 1-block push: ~0.1 s)
        first = await _first_token_seconds(cluster, list(range(10, 210)))
        assert metric(worker_metrics(cluster.role("decode")[0]), "tandem_disaggregation_decisions_total",
                      decision="remote") == 2
        assert modelled <= first < modelled + 1.0, (first, modelled)
        await assert_pools_clean(cluster)
