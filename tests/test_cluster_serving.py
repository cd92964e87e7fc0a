"""The whole cluster (`tandem up`: etcd, router, workers as OS processes) answers 32 concurrent
greedy requests of mixed lengths exactly as the engine alone does, through gRPC and through the
OpenAI API (official client, streaming and not), disaggregated 1P+1D and 2P+1D and aggregated, 1P+1D
with async scheduling, and 1P+1D with small pools and a second KV tier.
Afterwards every worker's block pool is back to free or cached."""

from __future__ import annotations

import openai
import pytest

from tests.support.cluster import assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.cluster_workload import Expected, Job, gather_limited, reference, run_grpc, run_openai, workload

CONFIGS = {"1P+1D": ("--prefill", "1", "--decode", "1"), "2P+1D": ("--prefill", "2", "--decode", "1"),
           "aggregated": ("--prefill", "0", "--decode", "0", "--both", "1"),
           # async scheduling (engine.step_pipeline) on CPU workers: the decode worker pipelines its steps between
           # remote prefills; the prefill worker's KV push hook takes whole steps
           "1P+1D async": ("--prefill", "1", "--decode", "1", "--async-scheduling", "true"),
           # pools of 48 blocks, too small for the workload, and a second KV tier in each worker: the second pass
           # (OpenAI) finds the first pass's prompts in a tier and loads them (the prefill worker pushes them on)
           "1P+1D offload": ("--prefill", "1", "--decode", "1", "--num-kv-blocks", "48", "--kv-offload-gib", "0.002"),
           # every decode step drafts (not left to the adaptive switch): greedy output must not change
           "1P+1D speculative": ("--prefill", "1", "--decode", "1", "--speculative-model", "self-int4",
                                 "--speculative-adaptive", "false")}


@pytest.fixture(scope="module")
def jobs():  # type: ignore[no-untyped-def]
    return workload()


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, jobs) -> list[Expected]:  # type: ignore[no-untyped-def]
    return reference(str(tiny_llama_dir), jobs)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
async def test_cluster_equals_engine_alone(config: str, tiny_llama_dir, jobs, expected) -> None:  # type: ignore[no-untyped-def]
    with tandem_up("--num-kv-blocks", "256", *CONFIGS[config], "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--min-remote-prefill-tokens", "8") as cluster:
        got = await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs])
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"gRPC request {i} ({jobs[i].kind}, {len(jobs[i].ids)} ids)"

        client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        answers = await gather_limited([run_openai(client, model, job, stream=i % 2 == 1)
                                        for i, job in enumerate(jobs)])
        for i, ((text, reason, used), e) in enumerate(zip(answers, expected, strict=True)):
            assert (text, reason, used) == (e.text, e.finish_reason, len(e.token_ids)), f"OpenAI request {i}"
        await client.close()

        for decode in cluster.role("decode"):  # the disaggregated path was really taken
            assert metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote") > 0
        for prefill in cluster.role("prefill"):
            assert metric(worker_metrics(prefill), "tandem_prefill_tokens_total", kind="computed") > 0
        if "--speculative-model" in CONFIGS[config]:
            decode = worker_metrics(cluster.role("decode")[0])
            assert metric(decode, "tandem_spec_draft_tokens_total", result="accepted") > 0
        if "--kv-offload-gib" in CONFIGS[config]:  # the tiers served (whichever worker prefilled: timing decides)
            assert sum(metric(worker_metrics(w), "tandem_kv_offload_blocks_total", op="load")
                       for w in cluster.workers) > 0
        await assert_pools_clean(cluster)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["aggregated", "1P+1D"])
@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_mixtral_dir", "tiny_qwen3_moe_dir",
                                     "tiny_gemma2_dir", "tiny_gemma3_dir", "tiny_gemma3_padded_dir", "tiny_phi3_dir",
                                     "tiny_mistral_window_dir"])
async def test_other_families_through_the_cluster_equal_the_engine_alone(fixture: str, config: str, jobs,  # type: ignore[no-untyped-def]
                                                                         request) -> None:
    """Other families than Llama's (Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mixtral's and Qwen3-MoE's
    experts, Gemma 2's windows and capped scores, Gemma 3's two RoPE bases, Phi-3's LongRoPE and partial rotary,
    Mistral's window in every layer: the decode worker reserves and receives only the blocks its window needs;
    Gemma's windowed and global layers in a hybrid KV layout, one with a slot no layer fills: each group's blocks;
    each engine alone equals transformers: test_engine_vs_transformers) through an aggregated worker, and through
    a prefill and a decode worker, over gRPC."""
    path = str(request.getfixturevalue(fixture))
    expected = reference(path, jobs)
    with tandem_up(*CONFIGS[config], "--model", path, "--dtype", "float32",
                   "--num-kv-blocks", "256", "--min-remote-prefill-tokens", "8") as cluster:
        got = await gather_limited([run_grpc(cluster.grpc_address, job) for job in jobs])
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"gRPC request {i} ({jobs[i].kind}, {len(jobs[i].ids)} ids)"
        if config == "1P+1D":
            decode = cluster.role("decode")[0]
            assert metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote") > 0
        await assert_pools_clean(cluster)


@pytest.mark.slow
async def test_deterministic_bf16_cluster_equals_engine_alone(tiny_llama_dir, jobs) -> None:  # type: ignore[no-untyped-def]
    """In bf16 only batch invariance makes a disaggregated cluster exact: the prefill worker computes a
    prompt's KV and first token amid other prompts than the engine alone did, the decode worker goes
    on amid yet others. With --deterministic every answer, logprobs to the last bit, equals the
    deterministic engine alone's. (On an AVX2-only CPU bf16 linears of this tiny model happen to be
    batch-invariant even without the flag; there the test still checks that the logprobs survive the
    P/D hand-off bit for bit. On AMX or AVX512-BF16 the flag is what makes it pass.)"""
    expected = reference(str(tiny_llama_dir), jobs, dtype="bfloat16", deterministic=True, logprobs=True)
    with tandem_up(*CONFIGS["1P+1D"], "--model", str(tiny_llama_dir), "--dtype", "bfloat16", "--deterministic", "true",
                   "--num-kv-blocks", "256", "--min-remote-prefill-tokens", "8") as cluster:
        got = await gather_limited([run_grpc(cluster.grpc_address, job, logprobs=True) for job in jobs])
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert len(g.logprobs) == len(g.token_ids)
            assert g == e, f"gRPC request {i} ({jobs[i].kind}, {len(jobs[i].ids)} ids)"
        decode = worker_metrics(cluster.role("decode")[0])
        assert metric(decode, "tandem_disaggregation_decisions_total", decision="remote") > 0
        await assert_pools_clean(cluster)


@pytest.mark.slow
async def test_default_model_cluster_answers_like_the_engine(default_model_path) -> None:
    """SmolLM2-135M-Instruct itself, 1P+1D, chat through the official client: the same greedy text
    as the engine alone, and the prompts were prefilled on the prefill worker."""
    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write a haiku about autumn leaves falling on a quiet river.", "What is 12 times 12?"]
    jobs = [Job("chat", text=q, max_tokens=12, ignore_eos=False) for q in questions]
    expected = reference(str(default_model_path), jobs)
    with tandem_up("--prefill", "1", "--decode", "1", "--dtype", "float32", "--num-kv-blocks", "64",
                   "--min-remote-prefill-tokens", "16") as cluster:
        client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        assert model == "SmolLM2-135M-Instruct"
        answers = await gather_limited([run_openai(client, model, job, stream=i % 2 == 0)
                                        for i, job in enumerate(jobs)])
        await client.close()
        assert answers == [(e.text, e.finish_reason, len(e.token_ids)) for e in expected]
        assert "Paris" in answers[0][0]
        decode = worker_metrics(cluster.role("decode")[0])
        assert metric(decode, "tandem_disaggregation_decisions_total", decision="remote") == len(jobs)
        await assert_pools_clean(cluster)
