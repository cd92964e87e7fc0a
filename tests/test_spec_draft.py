"""Speculative decoding with a draft model: greedy output token-for-token that of plain decoding (and of
transformers), sampled output distributed as plain decoding's (a chi-squared test that fails once the
acceptance rule is broken), and no draft block left behind by aborts, preemption or the end of requests."""

from __future__ import annotations

import math
import pathlib
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams, SpeculativeConfig, model_runner
from engine.errors import ModelLoadError
from engine.spec_sampling import positional_distributions
from tests.conftest import _common, build_tiny_tokenizer
from tests.support.hf_reference import hf_greedy
from tests.support.prompts import varied_prompts

FORCED = SpeculativeConfig(method="draft", num_draft_tokens=3, adaptive=False)  # every step speculates
PROMPTS = [[(7 * i + j % (5 + i)) % 500 + 3 for j in range(n)] for i, n in enumerate((1, 3, 16, 17, 40, 90, 150))]
# significance of each chi-squared test; a true match fails one of the 3 with probability < 0.3%
ALPHA = 0.001


def _peaked_tiny_llama(factory: pytest.TempPathFactory, name: str, head_scale: float) -> pathlib.Path:
    """The tiny Llama's weights (seed 0) and tokenizer with its lm_head scaled up: at temperature 0.8 a few
    tokens carry most of the probability (a random checkpoint's is near uniform over 512, too flat to test)."""
    directory = factory.mktemp(name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_common(tie_word_embeddings=False)))  # type: ignore[arg-type]
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(str(directory))
    build_tiny_tokenizer(directory, add_bos=True)
    return directory


@pytest.fixture(scope="module")
def peaked_target_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return _peaked_tiny_llama(tmp_path_factory, "peaked_target", 20.0)


@pytest.fixture(scope="module")
def peaked_draft_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A sharper copy of the target: about 2 drafts in 3 kept, and rejections common enough that the residual
    distribution shapes what is emitted (measured: drawing from p instead of the residual gives p ~ 1e-6)."""
    return _peaked_tiny_llama(tmp_path_factory, "peaked_draft", 40.0)


def _assert_clean(llm: LLM) -> None:
    engine = llm.engine
    engine.check_integrity()
    assert engine.draft is not None and engine.draft.states == {}
    if engine.draft.blocks is not None:  # a draft with its own pool
        assert engine.draft.blocks.num_free_blocks == engine.draft.blocks.num_blocks
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("config", [
    {"max_num_batched_tokens": 32},  # chunked prefill
    {"num_kv_blocks": 12, "max_num_batched_tokens": 24, "max_model_len": 190},  # forced preemption
])
@pytest.mark.parametrize("own_pool", [False, True], ids=["self-int4", "own-pool"])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_greedy_with_a_draft_is_token_exact(fixture, config, own_pool, request) -> None:
    """self-int4 drafts inside the target's pool (a hybrid layout's every group: Gemma 3, engine.kv_groups); a
    draft given by path (here the target's own checkpoint: every draft is kept) has its own pool and prefix
    cache, kept in step through rejections and preemption."""
    path = str(request.getfixturevalue(fixture))
    spec = SpeculativeConfig(method="draft", num_draft_tokens=3, adaptive=False, draft_model=path) if own_pool \
        else FORCED
    llm = LLM(path, dtype="float32", **{"num_kv_blocks": 64, **config}, speculative=spec)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for _ in range(2):  # the second round reads both prefix caches
        outputs = llm.generate(PROMPTS, params)
        for out, prompt in zip(outputs, PROMPTS, strict=True):
            assert out.token_ids == hf_greedy(path, prompt, 12, eos_ids=())
        _assert_clean(llm)
    engine = llm.engine
    assert engine.num_draft_tokens_accepted > 0 and engine.draft is not None
    assert (engine.draft.blocks is not None) == own_pool
    assert engine.parts.kv_groups.is_hybrid == (fixture == "tiny_gemma3_dir")
    if own_pool:  # as many blocks as the target's pool holds blocks of every layer (its blocks of one group, each)
        groups, target_blocks = engine.parts.kv_groups, engine.block_manager.num_blocks
        assert engine.draft.blocks.num_blocks == target_blocks * groups.group_size // len(groups.placement)
    if config.get("num_kv_blocks") == 12 and fixture == "tiny_llama_dir":  # (Gemma 3's hybrid layout holds these
        assert engine.scheduler.num_preemptions_total > 0             # prompts in the same bytes)
    elif engine.draft.blocks is not None:
        assert engine.draft.blocks.cached  # the draft's own prefix cache is filled (and read in round 2)


def test_a_windowed_draft_of_its_own_gives_back_its_blocks(tiny_mistral_window_dir) -> None:
    """A draft with its own pool whose every layer has a window (here the target's own checkpoint, window 8) gives
    back the blocks its window has left, as the target does, and finds its prompts again from the cached blocks
    within the window of their ends; outputs stay transformers'."""
    path = str(tiny_mistral_window_dir)
    llm = LLM(path, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=32,
              speculative=SpeculativeConfig(method="draft", num_draft_tokens=3, adaptive=False, draft_model=path))
    draft = llm.engine.draft
    assert draft is not None and draft.blocks is not None and draft.window == 8
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    hits = []
    for _ in range(2):  # the second round reads the draft's prefix cache
        outputs = llm.generate(PROMPTS, params)
        for out, prompt in zip(outputs, PROMPTS, strict=True):
            assert out.token_ids == hf_greedy(path, prompt, 12, eos_ids=())
        _assert_clean(llm)
        hits.append(draft.blocks.stats_hit_blocks)
    assert draft.num_blocks_behind_window_total > 0 and llm.engine.num_draft_tokens_accepted > 0
    assert hits[1] > hits[0]


def test_greedy_with_penalties_bias_and_logprobs_matches_plain_decoding(tiny_llama_dir) -> None:
    """These requests go through rejection sampling (one-hot distributions), not the argmax check."""
    path = str(tiny_llama_dir)
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, frequency_penalty=0.5, logprobs=2),
              SamplingParams(temperature=0, max_tokens=14, logit_bias={9: 3.0, 11: -100.0}, min_tokens=5)]
    prompts = PROMPTS[2:5]
    plain = LLM(path, dtype="float32", num_kv_blocks=64).generate(prompts, params)
    spec = LLM(path, dtype="float32", num_kv_blocks=64, speculative=FORCED)
    drafted = spec.generate(prompts, params)
    for want, got in zip(plain, drafted, strict=True):
        assert got.token_ids == want.token_ids
    assert [lp.token_id for lp in drafted[1].logprobs] == drafted[1].token_ids
    for want_lp, got_lp in zip(plain[1].logprobs, drafted[1].logprobs, strict=True):
        assert got_lp.logprob == pytest.approx(want_lp.logprob, abs=1e-4)
    assert spec.engine.num_draft_tokens_proposed > 0
    _assert_clean(spec)


@pytest.mark.slow
def test_default_model_with_self_int4_matches_plain_decoding(default_model_path) -> None:
    path = str(default_model_path)
    plain = LLM(path, dtype="float32")
    prompts = varied_prompts(plain.tokenizer)
    params = SamplingParams(temperature=0, max_tokens=16)
    want = [out.token_ids for out in plain.generate(prompts, params)]
    del plain
    spec = LLM(path, dtype="float32", speculative=SpeculativeConfig(method="draft", num_draft_tokens=4,
                                                                    adaptive=False))
    got = [out.token_ids for out in spec.generate(prompts, params)]
    assert got == want
    assert spec.engine.num_draft_tokens_accepted > spec.engine.num_draft_tokens_proposed / 2
    _assert_clean(spec)


def _first_tokens(llm: LLM, prompt: list[int], count: int) -> list[tuple[int, ...]]:
    """`count` samples, unseeded (a seeded request does not speculate): the engine's own seed makes them repeat."""
    params = SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True)
    return [tuple(out.token_ids) for out in llm.generate([prompt] * count, params)]


def _homogeneity_p(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> float:
    """Chi-squared test that two samples share a distribution: categories seen fewer than 10 times in the two
    together are pooled into one (the test's expected counts need to be large enough)."""
    counts_a, counts_b = Counter(a), Counter(b)
    common = [c for c in set(counts_a) | set(counts_b) if counts_a[c] + counts_b[c] >= 10]
    rest_a = len(a) - sum(counts_a[c] for c in common)
    rest_b = len(b) - sum(counts_b[c] for c in common)
    table = [[counts_a[c] for c in common] + [rest_a], [counts_b[c] for c in common] + [rest_b]]
    columns = [(x, y) for x, y in zip(*table, strict=True) if x + y > 0]
    total_a, total_b = sum(x for x, _ in columns), sum(y for _, y in columns)
    n = total_a + total_b
    statistic = 0.0
    for x, y in columns:
        for observed, row_total in ((x, total_a), (y, total_b)):
            expected = row_total * (x + y) / n
            statistic += (observed - expected) ** 2 / expected
    dof = len(columns) - 1
    if dof == 0:
        return 1.0
    # the chi-squared survival function: the regularized upper incomplete gamma Q(dof / 2, statistic / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def sampled_without_speculation(peaked_target_dir) -> list[tuple[int, ...]]:
    llm = LLM(str(peaked_target_dir), dtype="float32", num_kv_blocks=512)
    return _first_tokens(llm, PROMPTS[3], 2000)


def _speculative_sample(target_dir, draft_dir) -> tuple[LLM, list[tuple[int, ...]]]:
    spec = SpeculativeConfig(method="draft", draft_model=str(draft_dir), num_draft_tokens=3, adaptive=False)
    llm = LLM(str(target_dir), dtype="float32", num_kv_blocks=512, speculative=spec)
    return llm, _first_tokens(llm, PROMPTS[3], 2000)


def test_sampling_with_a_draft_keeps_the_target_distribution(peaked_target_dir, peaked_draft_dir,
                                                                 sampled_without_speculation) -> None:
    """2000 seeded samples of the first 3 tokens at temperature 0.8, with a draft model whose distribution
    differs from the target's against none: the second token, the first two and all three are
    distributed alike (chi-squared homogeneity, each at ALPHA; the first comes from the prompt's step)."""
    llm, drafted = _speculative_sample(peaked_target_dir, peaked_draft_dir)
    engine = llm.engine
    assert engine.num_draft_tokens_proposed > 1000
    assert 0.2 < engine.num_draft_tokens_accepted / engine.num_draft_tokens_proposed < 0.95
    assert len(set(drafted)) > 20  # the test has categories to compare
    for part in (slice(1, 2), slice(0, 2), slice(0, 3)):
        p = _homogeneity_p([s[part] for s in sampled_without_speculation], [s[part] for s in drafted])
        assert p > ALPHA, f"tokens {part.start}..{part.stop - 1} differ in distribution (p = {p:.2g})"
    _assert_clean(llm)


def _keep_every_draft(sampler, logits, state, draft_token_ids, draft_probs):
    """Broken: no draft is ever rejected (the draft's distribution comes out)."""
    p = positional_distributions(sampler, logits, state, draft_token_ids)
    return [*draft_token_ids, sampler.draw(p[-1], state)]


def _resample_from_p(sampler, logits, state, draft_token_ids, draft_probs):
    """Broken: after a rejection the token is drawn from p, not from the residual max(0, p - q)."""
    p = positional_distributions(sampler, logits, state, draft_token_ids)
    uniform = sampler.uniforms(len(draft_token_ids), state)
    for j, token in enumerate(draft_token_ids):
        if not uniform[j] * draft_probs[j, token] < p[j, token]:
            return [*draft_token_ids[:j], sampler.draw(p[j], state)]
    return [*draft_token_ids, sampler.draw(p[-1], state)]


@pytest.mark.parametrize("broken", [_keep_every_draft, _resample_from_p])
def test_the_distribution_test_catches_a_broken_acceptance_rule(peaked_target_dir, peaked_draft_dir,
                                                                sampled_without_speculation, monkeypatch,
                                                                broken) -> None:
    monkeypatch.setattr(model_runner, "verify_by_rejection", broken)
    _, drafted = _speculative_sample(peaked_target_dir, peaked_draft_dir)
    worst = min(_homogeneity_p([s[part] for s in sampled_without_speculation], [s[part] for s in drafted])
                for part in (slice(1, 2), slice(0, 2), slice(0, 3)))
    assert worst < ALPHA


def test_sampling_with_speculation_repeats_under_the_engine_seed(peaked_target_dir, peaked_draft_dir) -> None:
    runs = [_speculative_sample(peaked_target_dir, peaked_draft_dir)[1][:200] for _ in range(2)]
    assert runs[0] == runs[1]


def test_seeded_requests_decode_plainly(peaked_target_dir, peaked_draft_dir) -> None:
    """A seeded request keeps its one draw per token (batch-independent, resumable after migration): it is not
    drafted for, and its tokens are those of an engine without speculation."""
    params = [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=i) for i in range(20)]
    plain = LLM(str(peaked_target_dir), dtype="float32", num_kv_blocks=512).generate([PROMPTS[3]] * 20, params)
    spec = SpeculativeConfig(method="draft", draft_model=str(peaked_draft_dir), num_draft_tokens=3, adaptive=False)
    llm = LLM(str(peaked_target_dir), dtype="float32", num_kv_blocks=512, speculative=spec)
    drafted = llm.generate([PROMPTS[3]] * 20, params)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert llm.engine.num_draft_tokens_proposed == 0


def test_aborts_and_finished_requests_leave_no_draft_block(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, speculative=FORCED)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS[:5]):
        params = SamplingParams(temperature=0.7 * (i % 2), max_tokens=30, ignore_eos=True, seed=i)
        engine.add_request(engine.make_request(f"r{i}", prompt, params))
    for _ in range(4):
        engine.step()
    assert engine.draft is not None and engine.num_draft_tokens_proposed  # drafting is under way
    engine.abort_request("r1")
    engine.abort_request("r4")
    engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
    _assert_clean(llm)


def test_a_draft_with_another_tokenizer_is_refused(tiny_llama_dir, tiny_qwen2_dir) -> None:
    spec = SpeculativeConfig(method="draft", draft_model=str(tiny_qwen2_dir))
    with pytest.raises(ModelLoadError, match=r"tokenizer|ends on"):
        LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, speculative=spec)


def test_the_expected_tokens_formula() -> None:
    from engine.spec_control import expected_tokens
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert math.isclose(expected_tokens(0.5, 2), 1 + 0.5 + 0.25)
