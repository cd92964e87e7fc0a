"""Tensor parallelism in the engine (engine.parallel): one process per rank, Gloo between them. Greedy output at
TP = 2 and 4 (and 3 for the default model) equals TP = 1 and transformers in fp32, token for token."""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest
import torch

from engine import LLM, SamplingParams, SpeculativeConfig
from engine.attention.planning import SeqSpan
from engine.config import EngineConfig, ModelConfig, MoEConfig
from engine.errors import EngineDeadError, ModelLoadError
from engine.parallel.shard import TPShard
from tests.support.hf_reference import hf_greedy

MAX_NEW = 12
LENGTHS = (1, 3, 16, 17, 40, 90, 150, 177)  # >= 8 prompts of mixed lengths, chunked by a 32-token budget
CONFIGS = {
    "chunked": {"max_num_batched_tokens": 32, "num_kv_blocks": 64},
    # 12 blocks of 16 tokens hold the longest request but not all at once: preempted and recomputed
    "preemption": {"num_kv_blocks": 12, "max_num_batched_tokens": 24, "max_model_len": 190},
}


def _prompts() -> list[list[int]]:
    return [[(7 * i + j % (5 + i)) % 500 + 3 for j in range(n)] for i, n in enumerate(LENGTHS)]


def _generate(path: str, tp: int, config: dict) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, dtype="float32", tensor_parallel_size=tp, **config)
    outs = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    return [o.token_ids for o in outs], llm


def _config(**fields: object) -> ModelConfig:
    base: dict[str, object] = dict(architecture="llama", vocab_size=10, hidden_size=8, intermediate_size=12,
                                   num_layers=1, num_heads=8, num_kv_heads=2, head_dim=4,
                                   max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e4)
    return ModelConfig(**{**base, **fields})  # type: ignore[arg-type]


def test_a_shard_holds_its_heads_columns_and_vocabulary_rows() -> None:
    cfg = _config()
    assert [TPShard(r, 2).query_heads(cfg) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [TPShard(r, 2).kv_heads(cfg) for r in range(2)] == [range(0, 1), range(1, 2)]
    # more ranks than KV heads: each rank holds the one its query heads read
    assert [TPShard(r, 4).kv_heads(cfg) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [TPShard(r, 4).vocab_rows(10) for r in range(4)] == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    local = TPShard(1, 4).local_config(cfg)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (2, 1, 3, 3)
    d = cfg.head_dim
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.arange(32 * 8.).reshape(32, 8),
               "model.layers.0.self_attn.k_proj.weight": torch.arange(8 * 8.).reshape(8, 8),
               "model.layers.0.self_attn.o_proj.weight": torch.arange(8 * 32.).reshape(8, 32),
               "model.layers.0.mlp.down_proj.weight": torch.arange(8 * 12.).reshape(8, 12),
               "model.embed_tokens.weight": torch.arange(10 * 8.).reshape(10, 8),
               "model.norm.weight": torch.ones(8)}
    shard = TPShard(3, 4).weights(weights, cfg)
    layer = "model.layers.0."
    for name, part in (("self_attn.q_proj.weight", (slice(6 * d, 8 * d),)),  # query heads 6, 7
                       ("self_attn.k_proj.weight", (slice(d, 2 * d),)),  # KV head 1, which they read
                       ("self_attn.o_proj.weight", (slice(None), slice(6 * d, 8 * d))),
                       ("mlp.down_proj.weight", (slice(None), slice(9, 12)))):
        assert torch.equal(shard[layer + name], weights[layer + name][part]), name
    embed = shard["model.embed_tokens.weight"]  # the last rank's one row, then zero padding to 3 rows
    assert embed.shape == (3, 8) and torch.equal(embed[0], weights["model.embed_tokens.weight"][9])
    assert not embed[1:].any()
    assert shard["model.norm.weight"] is weights["model.norm.weight"]


def test_a_model_that_does_not_split_is_refused_naming_its_numbers() -> None:
    with pytest.raises(ModelLoadError, match=r"8 query heads do not split into 3 ranks.*2 KV heads neither"):
        TPShard(0, 3).check(_config())
    moe = MoEConfig(num_experts=2, top_k=1, intermediate_size=5, normalize_top_k=True)
    with pytest.raises(ModelLoadError, match="expert intermediate size 5 does not split into 2"):
        TPShard(0, 2).check(_config(architecture="mixtral", moe=moe))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tensor_parallel_output_equals_one_rank_and_transformers(fixture, tp, name, request) -> None:
    """Tiny Llama (untied) and Qwen2 (tied, q/k/v biases): 4 query and 2 KV heads, so TP = 4 replicates KV heads."""
    path = str(request.getfixturevalue(fixture))
    config = CONFIGS[name]
    one, single = _generate(path, 1, config)
    single.engine.close()
    many, llm = _generate(path, tp, config)
    try:
        assert many == one
        assert many == [hf_greedy(path, p, MAX_NEW, eos_ids=()) for p in _prompts()]
        leader = llm.engine.parts.tp_leader
        assert leader is not None and len(leader.pids) == tp - 1
        assert llm.engine.kv_pool.spec.num_kv_heads == (1 if tp >= 2 else 2)
        if name == "preemption":
            assert llm.engine.scheduler.num_preemptions_total > 0
        llm.engine.check_integrity()
    finally:
        llm.engine.close()


@pytest.mark.parametrize("fixture", ["tiny_qwen3_dir", "tiny_mixtral_dir", "tiny_gemma2_dir"])
def test_other_families_split_alike(fixture, request) -> None:
    """Per-head q/k norms (Qwen3), experts (Mixtral), soft-capped logits and windows (Gemma 2) at TP = 2."""
    path = str(request.getfixturevalue(fixture))
    many, llm = _generate(path, 2, CONFIGS["chunked"])
    try:
        assert many == [hf_greedy(path, p, MAX_NEW, eos_ids=()) for p in _prompts()]
    finally:
        llm.engine.close()


def test_a_rank_that_dies_ends_the_engine(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=64)
    leader = llm.engine.parts.tp_leader
    assert leader is not None
    heard: list[str] = []
    leader.on_lost.append(heard.append)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))
        os.kill(leader.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard and "rank 1" in heard[0] and str(-signal.SIGKILL) in heard[0]
        with pytest.raises(EngineDeadError, match="tensor-parallel"):
            llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))
    finally:
        llm.engine.close()


def test_a_rank_that_cannot_load_fails_the_engine_with_its_reason(tiny_llama_dir) -> None:
    with pytest.raises(ModelLoadError, match="query heads do not split into 3"):
        LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=3, num_kv_blocks=64)


@pytest.mark.slow
def test_default_model_at_three_ranks_equals_transformers(default_model_path) -> None:
    """SmolLM2-135M: 9 query heads and 3 KV heads, so TP = 3 (one KV head per rank)."""
    path = str(default_model_path)
    llm = LLM(path, dtype="float32", tensor_parallel_size=3, max_num_batched_tokens=64)
    try:
        prompts = [llm.tokenizer.encode(t) for t in ("The capital of France is", "Once upon a time",
                                                      "def fibonacci(n):", "1, 2, 3, 4,", "Hello",
                                                      "The quick brown fox " * 20, "Water boils at", "Why")]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
        eos = llm.tokenizer.eos_token_ids
        assert [o.token_ids for o in outs] == [hf_greedy(path, p, MAX_NEW, eos) for p in prompts]
    finally:
        llm.engine.close()


FEATURES = {  # what a step computes or samples beyond the plain greedy loop: alike at one rank and at two
    "ngram": {"speculative": SpeculativeConfig(num_draft_tokens=3, max_running_seqs=64)},
    "draft_model": {"speculative": "draft"},  # the tiny Llama drafting for itself, whole on rank 0
    # its own weights in int4, split as the target over each rank's pool (the ranks follow its forwards)
    "self_int4": {"speculative": SpeculativeConfig(num_draft_tokens=3, method="draft", adaptive=False)},
    "async_scheduling": {"async_scheduling": True},
    "gloo_only": {"tensor_parallel_shared_memory": False},  # every exchange through Gloo, none in shared memory
    "logprobs": {},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_speculation_async_scheduling_sampling_and_logprobs_as_with_one_rank(feature, tiny_llama_dir) -> None:
    path = str(tiny_llama_dir)
    config = {**CONFIGS["chunked"], **FEATURES[feature]}
    if config.get("speculative") == "draft":
        config["speculative"] = SpeculativeConfig(num_draft_tokens=3, method="draft", draft_model=path,
                                                  adaptive=False)
    prompts = _prompts()
    greedy = [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)] * len(prompts)
    if feature == "logprobs":  # seeded sampling, top logprobs of sampled and prompt tokens
        greedy = [SamplingParams(temperature=0.8, seed=i, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2,
                                 prompt_logprobs=2) for i in range(len(prompts))]
    results, accepted = [], []
    for tp in (1, 2):
        llm = LLM(path, dtype="float32", tensor_parallel_size=tp, **config)
        try:
            results.append(llm.generate(prompts, greedy))
            accepted.append(llm.engine.num_draft_tokens_accepted)
        finally:
            llm.engine.close()
    one, two = results
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    if feature in ("ngram", "draft_model", "self_int4"):  # the drafts are the same at two ranks
        assert accepted[0] > 0 and accepted[1] == accepted[0]
    if feature == "logprobs":
        for a, b in zip(one, two, strict=True):
            assert a.logprobs is not None and b.logprobs is not None and a.prompt_logprobs is not None
            pairs = list(zip(a.logprobs, b.logprobs, strict=True))
            pairs += list(zip(a.prompt_logprobs[1:], (b.prompt_logprobs or [])[1:], strict=True))
            for x, y in pairs:
                assert x is not None and y is not None
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    else:
        assert [o.token_ids for o in two] == [hf_greedy(path, p, MAX_NEW, eos_ids=()) for p in prompts]


def test_a_draft_that_cannot_load_ends_the_ranks_started(tiny_llama_dir) -> None:
    before = _followers()
    with pytest.raises(ModelLoadError, match="missing does not exist"):
        LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=64,
            speculative=SpeculativeConfig(method="draft", draft_model=str(tiny_llama_dir / "missing")))
    assert _followers() == before  # the rank started for it ended with it


def _followers() -> set[int]:
    """This process's live rank processes."""
    children = pathlib.Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return {int(pid) for pid in children
            if b"engine.tp_follower" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()}


def test_a_self_int4_draft_is_split_as_its_target(tiny_llama_dir) -> None:
    """Each rank drafts with its shard of the int4 weights over its own pool: the draft's logits at two ranks are
    the int4 model's at one (to the order of a sum), not the fp32 target's."""
    spans_tokens = [[5, 9, 13, 200, 7], [11], [40, 41, 42]]
    found = []
    for tp in (1, 2):
        llm = LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=tp, num_kv_blocks=64,
                  speculative=SpeculativeConfig(num_draft_tokens=3, method="draft", adaptive=False))
        try:
            engine, draft = llm.engine, llm.engine.draft
            assert draft is not None and draft.parts.model.config.num_heads == 4 // tp  # (the tiny Llama's 4)
            tables = [engine.block_manager.allocate(1) for _ in spans_tokens]
            spans = [SeqSpan(table, 0, len(tokens)) for table, tokens in zip(tables, spans_tokens, strict=True)]
            spans.sort(key=lambda s: s.num_tokens != 1)  # (single-token spans first, as the draft feeds them)
            ids = [t for span in spans for t in spans_tokens[tables.index(span.block_table)]]
            found.append(draft.runner.logits_at_ends(ids, spans).clone())
            for table in tables:
                engine.block_manager.release(table)
        finally:
            llm.engine.close()
    one, two = found
    assert torch.allclose(two, one, atol=1e-4), (two - one).abs().max()


def test_a_rank_on_a_cpu_takes_its_share_of_the_cores(tiny_llama_dir) -> None:
    """Unless told (num_threads, per rank), each of N ranks runs cores // N torch threads (at least one): by default
    torch would give every rank all the cores, N times as many threads as cores. (conftest restores the count.)"""
    from engine.llm_engine import LLMEngine
    from engine.parallel.protocol import RankPlugin

    cores = len(os.sched_getaffinity(0))
    for told, expected in ((None, max(1, cores // 2)), (3, 3)):
        torch.set_num_threads(cores)
        engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2,
                                        num_kv_blocks=64, num_threads=told),
                           rank_plugin=RankPlugin("tests.support.rank_probe", None))
        try:
            assert engine.parts.tp_leader is not None
            assert torch.get_num_threads() == expected  # rank 0's, as this process's
            assert engine.parts.tp_leader.command("threads") == [expected]  # rank 1's
        finally:
            engine.close()


def test_a_command_answered_later_leaves_the_rank_stepping(tiny_llama_dir) -> None:
    """A command whose reply is a Future (a handshake with a decode peer: worker_runtime.tp_kv_rank) does not hold
    the rank's step loop: the probe answers "hold" only after it ran two more steps, which rank 0 sends meanwhile.
    A Future that fails fails the command; the rank goes on."""
    import concurrent.futures

    from engine.errors import RankCommandError
    from engine.llm_engine import LLMEngine
    from engine.parallel.protocol import RankPlugin
    from engine.request import EngineRequest

    config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=64)
    engine = LLMEngine(config, rank_plugin=RankPlugin("tests.support.rank_probe", None))
    leader = engine.parts.tp_leader
    assert leader is not None
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = pool.submit(leader.command, "hold")
            failed = pool.submit(leader.command, "fail")
            for step in range(500):  # (steps until both are answered, however late the threads sent them)
                if held.done() and failed.done():
                    break
                if not engine.has_unfinished_requests():
                    engine.add_request(EngineRequest(f"r{step}", (5, 6, 7), SamplingParams(
                        temperature=0, max_tokens=4, ignore_eos=True)))
                engine.step()
            assert held.result(timeout=30) == [2]
            with pytest.raises(RankCommandError, match="failed on purpose"):
                failed.result(timeout=30)
        assert leader.command("echo") == ["echo"]

        # a command that times out: its reply, landing later, is deleted from the store by the next command
        with pytest.raises(RankCommandError, match="did not answer within"):
            leader.command("hold", timeout_s=0.2)
        (late,) = leader.late_replies
        store = torch.distributed.TCPStore("127.0.0.1", leader.store_port, is_master=False, wait_for_workers=False)
        for step in range(500):
            if store.check([late]):
                break
            if not engine.has_unfinished_requests():
                engine.add_request(EngineRequest(f"late{step}", (5, 6, 7), SamplingParams(
                    temperature=0, max_tokens=4, ignore_eos=True)))
            engine.step()
        assert store.check([late])
        assert leader.command("echo") == ["echo"]
        assert not store.check([late]) and not leader.late_replies
    finally:
        engine.close()


def _turns(llm: LLM, params: SamplingParams) -> list[list[int]]:
    """Three ~150-token conversations taking three turns, one request at a time (they evict each other from a
    small pool): every turn's output."""
    convs = [[(13 * i + 7 * j) % 480 + 11 for j in range(150)] for i in range(3)]
    outs = []
    for turn in range(3):
        for i, conv in enumerate(convs):
            out = llm.generate([conv], params)[0].token_ids
            outs.append(out)
            convs[i] = conv + out + [(turn * 31 + i * 5 + j) % 470 + 17 for j in range(10)]
    return outs


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_kv_offload_tier_keeps_every_ranks_heads(tiny_llama_dir, async_scheduling: bool) -> None:
    """A pool of 14 blocks holds one conversation: returning turns are loaded from the second tier. Rank 0's tier
    decides; rank 1 makes the same copies of its KV heads (engine.kv_offload_mirror). Outputs equal one rank's with
    a pool that holds everything (fp32), and rank 0 loaded blocks from its tier."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = _turns(LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=256), params)
    llm = LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=14, max_model_len=220,
              kv_offload_bytes=8 << 20, async_scheduling=async_scheduling, max_num_batched_tokens=64)
    try:
        assert _turns(llm, params) == expected
        tier = llm.engine.offload
        assert tier is not None and tier.stats().loaded_blocks >= 2 * 3 * (150 // 16)
        llm.engine.check_integrity()
    finally:
        llm.engine.close()


def test_a_command_carries_the_tier_copies_logged_before_it(tiny_llama_dir) -> None:
    """A command may open blocks to writes from other workers (a decode group's page grants), so the tier copies
    rank 0 logged before it (here: the stores of a finished request's blocks, with no step after them) go with it,
    to be made first; the request asked again is then loaded back from the tier exactly."""
    from engine.llm_engine import LLMEngine
    from engine.parallel.protocol import RankPlugin
    from engine.request import EngineRequest

    config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=14,
                          max_model_len=220, kv_offload_bytes=8 << 20)
    engine = LLMEngine(config, rank_plugin=RankPlugin("tests.support.rank_probe", None))
    leader, tier = engine.parts.tp_leader, engine.offload
    assert leader is not None and tier is not None
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(request_id: str, prompt: list[int]) -> list[int]:
        engine.add_request(EngineRequest(request_id, tuple(prompt), params))
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = list(out.token_ids)
        return tokens

    try:
        prompt = [(11 * j) % 470 + 13 for j in range(150)]
        first = run("a", prompt)
        assert tier.copies  # the finished request's blocks, logged, sent with nothing yet
        assert leader.command("echo") == ["echo"]
        assert tier.copies == []  # they went with the command
        run("b", [(17 * j) % 430 + 29 for j in range(170)])  # evicts the first prompt's blocks from the pool
        assert run("c", prompt) == first and tier.stats().loaded_blocks > 0
    finally:
        engine.close()
