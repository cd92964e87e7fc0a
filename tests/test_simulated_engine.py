"""The simulated engine (engine.simulated): the real scheduler, prefix cache and sampler over a timing
model. Its streams are exactly its deterministic model's, alone and through a cluster of simulated worker
processes (aggregated and 1P+1D, over the real router, etcd and KV transfer path); its steps take the
profile's time; what it cannot simulate is refused."""

from __future__ import annotations

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.errors import ModelLoadError
from engine.simulated.profile import SimulationProfile
from engine.simulated.runner import SimulatedRunner
from tests.support.cluster import assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.cluster_workload import Expected, Job, run_grpc
from tests.support.simulation import expected, write_profile


def test_the_profile_interpolates_and_refuses_bad_curves(tiny_llama_dir, tmp_path) -> None:
    profile = SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir))
    assert profile.step_seconds(16, 0, 0) == pytest.approx(0.002)
    assert profile.step_seconds(136, 0, 0) == pytest.approx(0.011)  # halfway between 16 and 256
    assert profile.step_seconds(8, 0, 0) == pytest.approx(0.001)  # through (0, 0) below the first point
    assert profile.step_seconds(4096, 0, 0) == pytest.approx(0.32)  # the last segment extended
    assert profile.step_seconds(0, 8, 1000) == pytest.approx(0.005 + 1e-4)
    assert profile.step_seconds(0, 0, 0) == 0.0
    # context beyond the decode curve's own (here 10 tokens per row) costs; less than it saves
    measured_at = SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, decode_context=10))
    assert measured_at.step_seconds(0, 8, 80) == pytest.approx(0.005) and measured_at.step_seconds(0, 8, 1080) == (
        pytest.approx(0.005 + 1e-4))
    falling = SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, decode=[[1, 0.003], [8, 0.002]]))
    assert falling.step_seconds(0, 64, 0) == pytest.approx(0.002)  # a noisy last segment does not fall on
    for bad in ([], [[16, 0.1]], [[16, 0.1], [16, 0.2]], [[0, 0.1], [4, 0.2]], [[4, -1.0], [8, 1.0]], "x"):
        with pytest.raises(ValueError, match="prefill"):
            SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, prefill=bad))


def test_long_prompts_pay_for_attention_and_decode_rows_beside_a_prefill_share_its_fixed_cost(
        tiny_llama_dir, tmp_path) -> None:
    profile = SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, prefill_prompt=16,
                                                   attention_s_per_pair=1e-6))
    packed = profile.step_seconds(256, 0, 0, prefill_pairs=256 * 17 // 2)  # 16 prompts of 16: the curve's own
    assert packed == pytest.approx(0.02)
    one_prompt = profile.step_seconds(256, 0, 0, prefill_pairs=256 * 257 // 2)
    assert one_prompt == pytest.approx(0.02 + 1e-6 * (256 * 257 / 2 - 256 * 17 / 2))
    # the decode curve (1, 3 ms), (8, 5 ms) meets 0 rows at 2.71 ms: beside a prefill, 8 rows add 2.29 ms
    assert profile.decode_intercept_s == pytest.approx(0.003 - 0.002 / 7)
    assert profile.step_seconds(256, 8, 0, 256 * 17 // 2) == pytest.approx(0.02 + 0.005 - (0.003 - 0.002 / 7))
    # adding prompt tokens to a decode step never makes it cheaper (the fixed cost is paid once, not refunded)
    alone = profile.step_seconds(0, 8, 0)
    assert all(profile.step_seconds(n, 8, 0, n * (n + 1) // 2) >= alone for n in (1, 2, 4, 16))
    slow = profile.slowed(4)
    assert slow.step_seconds(256, 8, 1000, 256 * 257 // 2) == pytest.approx(
        4 * profile.step_seconds(256, 8, 1000, 256 * 257 // 2))
    with pytest.raises(ValueError, match="prefill_prompt"):
        SimulationProfile.load(write_profile(tmp_path, tiny_llama_dir, attention_s_per_pair=1e-6))


def test_streams_are_the_simulated_models_with_real_batching_caching_and_sampling(tiny_llama_dir, tmp_path) -> None:
    llm = LLM(str(tiny_llama_dir), simulate=str(write_profile(tmp_path, tiny_llama_dir)), num_kv_blocks=48,
              block_size=4, max_num_batched_tokens=32)
    prompts = [[5 + i] * (3 + 17 * i) for i in range(8)]  # 3 to 122 tokens: chunked, and preempted with 48 blocks
    greedy = SamplingParams(temperature=0, max_tokens=20)
    outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [expected(llm, p, 20) for p in prompts]
    assert all(o.finish_reason == "length" for o in outs)
    assert llm.engine.scheduler.num_preemptions_total > 0
    # the prefix cache is the real one: the same prompt again is served from it
    once, again = (llm.generate([prompts[3]], greedy)[0] for _ in range(2))
    assert again.num_cached_tokens > once.num_cached_tokens and again.token_ids == outs[3].token_ids
    # a model certain of its next token: sampling at any temperature, seeded or not, picks it
    sampled = llm.generate(prompts[:3], SamplingParams(temperature=1.3, top_p=0.9, seed=7, max_tokens=8, logprobs=1))
    assert [o.token_ids for o in sampled] == [expected(llm, p, 8) for p in prompts[:3]]
    assert all(lp is not None and lp.logprob > -1e-6 for o in sampled for lp in o.logprobs or ())
    # logit_bias is applied to the simulated logits like to real ones: a large enough one wins
    banned = expected(llm, prompts[0], 1)[0]
    biased = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1, logit_bias={banned: -100.0}))[0]
    assert biased.token_ids != [banned]
    # prompt logprobs score each prompt token against the simulated model's choice before it: a prompt the
    # model would have written scores ~0 everywhere; one changed token scores ~-CERTAINTY there and at the two
    # after it (the model reads the last two tokens), nowhere else (the 40 tokens span two chunks of 32)
    written = [9, *expected(llm, [9], 39)]
    changed = [*written[:25], (written[25] + 1) % 500, *written[26:]]
    for prompt, low in ((written, []), (changed, [25, 26, 27])):
        scored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
        assert scored.prompt_logprobs is not None and len(scored.prompt_logprobs) == 40
        values = [lp.logprob if lp is not None else None for lp in scored.prompt_logprobs]
        assert values[0] is None  # nothing scores the first token
        assert [i for i, v in enumerate(values[1:], 1) if v is not None and v < -1] == low
        assert all(values[i] == pytest.approx(-60.0, abs=1e-3) for i in low)
    llm.engine.check_integrity()


def test_a_step_takes_the_profiled_time(tiny_llama_dir, tmp_path) -> None:
    """On the runner's own clock: the time slept over a request is the profile's, step by step, and a KV push
    hook is told of every layer in turn within the step."""
    llm = LLM(str(tiny_llama_dir), simulate=str(write_profile(tmp_path, tiny_llama_dir)), num_kv_blocks=64,
              block_size=4)
    runner = llm.engine.runner
    assert isinstance(runner, SimulatedRunner)
    now = [0.0]
    slept: list[float] = []
    layers: list[tuple[int, float]] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    runner.clock, runner.sleep = (lambda: now[0]), sleep
    runner.layer_observer = lambda layer, ready: layers.append((layer, now[0]))
    llm.generate([[7] * 100], SamplingParams(temperature=0, max_tokens=3))
    profile = runner.profile
    want = profile.step_seconds(100, 0, 0) + profile.step_seconds(0, 1, 101) + profile.step_seconds(0, 1, 102)
    assert now[0] == pytest.approx(want)
    num_layers = llm.engine.model_config.num_layers
    first_step = [t for layer, t in layers[:num_layers]]
    assert [layer for layer, _ in layers] == list(range(num_layers)) * 3
    assert first_step[-1] == pytest.approx(profile.step_seconds(100, 0, 0)) and first_step == sorted(first_step)


@pytest.mark.parametrize("change", [{"async_scheduling": True}, {"deterministic": True}, {"quantization": "int8"}])
def test_what_a_simulation_cannot_do_is_refused(tiny_llama_dir, tmp_path, change) -> None:
    with pytest.raises(ValueError, match="simulated engine runs no model"):
        EngineConfig(simulate=str(write_profile(tmp_path, tiny_llama_dir)), **change)


def test_a_profile_of_another_model_is_refused(tiny_llama_dir, tiny_qwen2_dir, tmp_path) -> None:
    """The worker serves the model it is named for: the profile must be of that checkpoint (its tokenizer)."""
    with pytest.raises(ModelLoadError, match="pass its checkpoint as --model"):
        LLM(model=str(tiny_qwen2_dir), simulate=str(write_profile(tmp_path, tiny_llama_dir)))


def test_a_bad_profile_is_refused_at_load_naming_the_file(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match=r"broken\.json"):
        LLM(simulate=str(path))


@pytest.mark.parametrize("layout", [("--prefill", "0", "--decode", "0", "--both", "1"),
                                    ("--prefill", "1", "--decode", "1")], ids=["aggregated", "1P+1D"])
async def test_a_cluster_of_simulated_workers_streams_exactly(tiny_llama_dir, tmp_path, layout) -> None:
    """Real worker processes with simulated engines behind the real router and etcd: every stream is the
    simulated model's; 1P+1D prefills remotely over the real KV transfer path (token-sized pages)."""
    profile = write_profile(tmp_path, tiny_llama_dir)
    alone = LLM(str(tiny_llama_dir), simulate=str(profile), num_kv_blocks=512)
    jobs = [Job("ids", ids=tuple([11 + i] * (4 + 23 * i)), max_tokens=6 + i) for i in range(8)]
    want = [Expected(tuple(o.token_ids), o.text, o.finish_reason or "")
            for o in alone.generate([list(j.ids) for j in jobs],
                                    [SamplingParams(temperature=0, max_tokens=j.max_tokens) for j in jobs])]
    assert [w.token_ids for w in want] == [tuple(expected(alone, list(j.ids), j.max_tokens)) for j in jobs]
    with tandem_up("--simulate", str(profile), "--model", str(tiny_llama_dir), "--num-kv-blocks", "512",
                   "--min-remote-prefill-tokens", "8", *layout) as cluster:
        got = [await run_grpc(cluster.grpc_address, job) for job in jobs]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.text for g in got] == [w.text for w in want]
        if layout[1] == "1":
            decode = cluster.role("decode")[0]
            assert metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote") > 0
        await assert_pools_clean(cluster)


def test_a_published_gpu_profile_is_labelled_and_drives_a_simulated_engine(tmp_path) -> None:
    """bench.sim_published: Llama-3.1-8B on an H100 from datasheet figures, labelled as not measured;
    a step reads the weights once (memory-bound at batch 1) and a simulated engine runs on it."""
    from bench.sim_published import GPUS, SHAPES, published_profile

    gpu, shape = GPUS["h100-sxm"], SHAPES["llama-3.1-8b"]
    profile = published_profile(gpu, shape, 0.5, 0.7, 0.0005, 49152)
    assert profile.source.startswith("published, not measured") and "3.35 TB/s" in profile.source
    weights_s = 2 * shape.matmul_weights / (0.7 * gpu.memory_bytes_per_s)
    assert 7.0e9 < shape.matmul_weights < 8.1e9 and weights_s == pytest.approx(0.0064, rel=0.05)
    assert profile.step_seconds(0, 1, 128) == pytest.approx(0.0005 + weights_s + 128 * profile.context_s_per_token)
    path = tmp_path / "h100.json"
    path.write_text(profile.to_json())
    llm = LLM(simulate=str(path), num_kv_blocks=64)
    out = llm.generate([[300, 301, 302]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.token_ids == expected(llm, [300, 301, 302], 4)
