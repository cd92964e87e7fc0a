"""A model whose every layer has a sliding window gives back the blocks its windows have left behind
(engine.scheduler): fewer blocks held for the same output, cached ones still found by the prefix cache,
pools whole. A model with windowed and global layers gives back its windowed layers' blocks (engine.kv_groups)."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from tests.support.hf_reference import hf_greedy

WINDOW, BLOCK, CHUNK = 8, 16, 32  # tiny_mistral_window_dir's window, the engine's block and its token budget


def _run(path: pathlib.Path, prompts: list[list[int]], give_back: bool, **config: object) -> tuple[list[list[int]],
                                                                                                      int, LLM]:
    """Greedy outputs and the most blocks held at once over the run."""
    llm = LLM(str(path), num_kv_blocks=64, dtype="float32", max_num_batched_tokens=CHUNK, **config)  # type: ignore[arg-type]
    engine = llm.engine
    if not give_back:
        engine.scheduler.window = 0
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=60,
                                                                                 ignore_eos=True)))
    outputs: dict[str, list[int]] = {}
    peak = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out.token_ids
        peak = max(peak, engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [outputs[f"r{i}"] for i in range(len(prompts))], peak, llm


@pytest.mark.parametrize("config", [{}, {"async_scheduling": True}], ids=["sync", "async"])
def test_blocks_behind_every_window_are_given_back(tiny_mistral_window_dir: pathlib.Path, config: dict) -> None:
    prompts = [[(13 * j + i) % 500 + 3 for j in range(150)] for i in range(4)]
    windowed, windowed_peak, llm = _run(tiny_mistral_window_dir, prompts, True, **config)
    full, full_peak, _ = _run(tiny_mistral_window_dir, prompts, False, **config)
    assert windowed == full == [hf_greedy(str(tiny_mistral_window_dir), p, 60, eos_ids=()) for p in prompts]
    # a sequence holds its window's blocks and one or two steps' chunk (async: the step in flight too)
    per_sequence = -(-(WINDOW - 1 + 2 * CHUNK) // BLOCK) + 1
    assert windowed_peak <= len(prompts) * per_sequence < full_peak
    print(f"peak blocks held: {windowed_peak} giving back, {full_peak} keeping every block")
    assert llm.engine.scheduler.num_blocks_behind_window_total >= len(prompts) * (200 // BLOCK - per_sequence)


def test_given_back_blocks_stay_in_the_prefix_cache(tiny_mistral_window_dir: pathlib.Path) -> None:
    """The blocks a finished sequence gave back while it ran are found by the next request with its prompt
    (their KV is intact until evicted), and its output is unchanged."""
    prompt = [(5 * j) % 400 + 7 for j in range(120)]
    llm = LLM(str(tiny_mistral_window_dir), num_kv_blocks=64, dtype="float32", max_num_batched_tokens=CHUNK)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    assert first.token_ids == second.token_ids == hf_greedy(str(tiny_mistral_window_dir), prompt, 20, eos_ids=())
    assert llm.engine.scheduler.num_blocks_behind_window_total > 0
    assert second.num_cached_tokens == 112  # every full block of the prompt but the last token's
    llm.engine.check_integrity()


def _peak_bytes(path: pathlib.Path, prompts: list[list[int]], **config: object) -> tuple[list[list[int]], int, LLM]:
    """Greedy outputs and the most KV bytes held at once over the run (blocks held x bytes of a pool block)."""
    outputs, peak, llm = _run(path, prompts, True, **config)
    return outputs, peak * llm.engine.kv_pool.spec.bytes_per_block, llm


@pytest.mark.parametrize("fixture", ["tiny_qwen2_window_dir", "tiny_gemma2_dir", "tiny_gemma3_dir",
                                     "tiny_gemma3_padded_dir"])
def test_a_model_with_global_layers_gives_back_its_windowed_layers_blocks(fixture: str,
                                                                         request: pytest.FixtureRequest) -> None:
    """Windowed and global layers in one model (engine.kv_groups): the windowed layers' blocks behind the window
    are given back while the global layers keep theirs, so the same requests hold fewer KV bytes, same output."""
    path = request.getfixturevalue(fixture)
    prompts = [[(13 * j + i) % 500 + 3 for j in range(150)] for i in range(4)]
    hybrid, hybrid_peak, llm = _peak_bytes(path, prompts)
    kept, kept_peak, kept_llm = _peak_bytes(path, prompts, hybrid_kv_cache=False)
    assert hybrid == kept == [hf_greedy(str(path), p, 60, eos_ids=()) for p in prompts]
    groups = llm.engine.parts.kv_groups
    assert groups.is_hybrid and not kept_llm.engine.parts.kv_groups.is_hybrid
    assert groups.num_padded_slots == (1 if fixture == "tiny_gemma3_padded_dir" else 0)
    assert llm.engine.scheduler.num_blocks_behind_window_total > 0
    assert kept_llm.engine.scheduler.num_blocks_behind_window_total == 0
    # same pool bytes both ways; a token behind every window costs only its global layers' KV
    assert llm.engine.kv_pool.spec.bytes_per_block * llm.engine.block_manager.num_blocks == \
        kept_llm.engine.kv_pool.spec.bytes_per_block * kept_llm.engine.block_manager.num_blocks
    num_layers = llm.engine.model_config.num_layers
    global_share = sum(1 for g, _ in groups.placement if groups.windows[g] == 0) / num_layers
    print(f"{fixture}: peak KV bytes {hybrid_peak} hybrid, {kept_peak} keeping every block")
    assert hybrid_peak < kept_peak * (global_share + 0.5 * (1 - global_share))


def test_a_hybrid_prefix_is_served_from_every_group(tiny_gemma3_dir: pathlib.Path) -> None:
    """A prompt asked again is served from the prefix cache of every group (its windowed groups' blocks within
    the window of the prefix's end), and answers as transformers does."""
    path = str(tiny_gemma3_dir)
    llm = LLM(path, num_kv_blocks=20, dtype="float32", max_num_batched_tokens=24)
    engine = llm.engine
    assert engine.parts.kv_groups.is_hybrid
    prompt = [(11 * j) % 470 + 13 for j in range(150)]
    want = [hf_greedy(path, prompt, 8, eos_ids=())]
    assert _bounded_run(llm, [prompt], 8) == want
    hits = engine.block_manager.stats_hit_blocks
    assert _bounded_run(llm, [prompt], 8) == want
    assert engine.block_manager.stats_hit_blocks == hits + 9  # every full block of the prompt but the last token's
    engine.check_integrity()


def test_a_runner_refuses_a_pool_its_groups_do_not_fit(tiny_gemma3_dir: pathlib.Path) -> None:
    """A hybrid pool (a layer per group here) given to a runner without its groups is refused, not misread."""
    from engine.model_runner import ModelRunner

    llm = LLM(str(tiny_gemma3_dir), num_kv_blocks=16, dtype="float32")
    parts = llm.engine.parts
    with pytest.raises(ValueError, match="does not hold groups of 3"):
        ModelRunner(parts.model, parts.pool, llm.engine.runner.sampler, parts.device)  # type: ignore[attr-defined]


def test_a_second_tier_keeps_one_group(tiny_gemma2_dir: pathlib.Path) -> None:
    """A second KV tier (and so the cluster KV store) copies blocks of every layer: the layout stays one group."""
    for config in ({"hybrid_kv_cache": False}, {"kv_offload_bytes": 1 << 20}):
        llm = LLM(str(tiny_gemma2_dir), num_kv_blocks=64, dtype="float32", **config)  # type: ignore[arg-type]
        assert not llm.engine.parts.kv_groups.is_hybrid, config


def test_kv_events_name_the_prompts_blocks_once(tiny_gemma3_dir: pathlib.Path) -> None:
    """A hybrid layout caches each block once per group, under keys of its own: KV events (the router's view)
    carry the block hashes only, as a single-group engine's would."""
    from engine.block_manager import hash_blocks

    prompt = [(7 * j) % 300 + 5 for j in range(70)]
    seen = []
    for hybrid in (True, False):
        llm = LLM(str(tiny_gemma3_dir), num_kv_blocks=64, dtype="float32", record_kv_events=True,
                  hybrid_kv_cache=hybrid)
        assert llm.engine.parts.kv_groups.is_hybrid == hybrid
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        events = llm.engine.block_manager.drain_events(with_snapshot=True)
        assert events.removed == ()
        seen.append((sorted(events.stored), sorted(events.snapshot or ())))
    hashes = sorted(hash_blocks(prompt + [0] * 4, BLOCK)[:4])  # the 4 full blocks of the prompt and its answer
    assert seen[0] == seen[1] == (hashes, hashes)


def _bounded_run(llm: LLM, prompts: list[list[int]], max_tokens: int, max_steps: int = 2000) -> list[list[int]]:
    """Greedy outputs, submitted together; fails instead of hanging if a request is never admitted."""
    engine = llm.engine
    start = engine.num_steps
    ids = [f"b{start}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(engine.make_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                           ignore_eos=True)))
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs[out.request_id] = out.token_ids
    assert not engine.has_unfinished_requests(), f"stuck: {engine.scheduler.waiting}"
    return [outputs[rid] for rid in ids]


@pytest.mark.parametrize("tier", [0, 1 << 20], ids=["pool", "second_tier"])
def test_a_cached_prefix_longer_than_the_pool_is_served_from_its_window(tiny_mistral_window_dir: pathlib.Path,
                                                                         tier: int) -> None:
    """A pool of 6 blocks (96 tokens) serves prompts of 150 tokens; run again (whole prompt cached in the pool or
    the second tier, more than the pool holds), and extended, the cached blocks behind the window are neither
    taken nor loaded, so the requests are admitted and answer as transformers does."""
    path = str(tiny_mistral_window_dir)
    llm = LLM(path, num_kv_blocks=WINDOW - 2, dtype="float32", max_num_batched_tokens=24, kv_offload_bytes=tier)
    prompt = [(3 * j) % 450 + 11 for j in range(150)]
    longer = prompt + [(7 * j) % 450 + 5 for j in range(50)]
    short = prompt[:96]
    offload = llm.engine.offload
    for run, (prompts, max_tokens) in enumerate((([prompt], 8), ([prompt], 8), ([longer], 8), ([short], 1),
                                                 ([short + longer[:50]], 8))):
        if offload is not None and run == 1:  # only the second tier holds the prompt now
            llm.engine.block_manager.reset_prefix_cache()
        served = llm.engine.block_manager.stats_hit_blocks if offload is None else offload.stats().loaded_blocks
        got = _bounded_run(llm, prompts, max_tokens)
        assert got == [hf_greedy(path, p, max_tokens, eos_ids=()) for p in prompts]
        llm.engine.check_integrity()
        if run == 1:  # the cached prompt was served, from the pool or (loaded) from the tier
            assert (llm.engine.block_manager.stats_hit_blocks if offload is None
                    else offload.stats().loaded_blocks) > served


def test_a_longrope_draft_rotates_as_its_target(tiny_phi3_dir: pathlib.Path) -> None:
    """The self-int4 draft of a long-context Phi-3 takes its target's LongRoPE set (its own one-block pool would
    pick the short one) and so has its drafts accepted."""
    from engine import SpeculativeConfig

    llm = LLM(str(tiny_phi3_dir), num_kv_blocks=64, dtype="float32", max_model_len=512,
              speculative=SpeculativeConfig(method="draft", num_draft_tokens=3, adaptive=False))
    draft = llm.engine.draft
    assert draft is not None and llm.engine.model_config.rope_scaling.use_long  # type: ignore[union-attr]
    assert draft.parts.model.config.rope_scaling.use_long  # type: ignore[union-attr]
    prompt = [(7 * j) % 400 + 9 for j in range(100)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(str(tiny_phi3_dir), prompt, 24, eos_ids=())


def test_a_windowed_prefix_is_found_after_its_first_blocks_were_evicted(tiny_mistral_window_dir: pathlib.Path) -> None:
    """The blocks a windowed sequence gave back first are evicted first; its prompt asked again is still served from
    the cached blocks within the window of the prefix's end (a contiguous match from the first block finds none)."""
    from engine.block_manager import hash_blocks

    path = str(tiny_mistral_window_dir)
    llm = LLM(path, num_kv_blocks=12, dtype="float32", max_num_batched_tokens=24)
    engine = llm.engine
    prompt = [(11 * j) % 470 + 13 for j in range(150)]
    other = [(17 * j) % 430 + 29 for j in range(60)]
    assert _bounded_run(llm, [prompt], 8) == [hf_greedy(path, prompt, 8, eos_ids=())]
    assert _bounded_run(llm, [other], 8) == [hf_greedy(path, other, 8, eos_ids=())]
    hashes = hash_blocks(prompt[:-1], BLOCK)
    assert engine.block_manager.peek_cached_prefix(hashes, prompt) == []  # its first block was evicted
    assert engine.remote_kv.cached_prefix_tokens(prompt[:-1]) == 144  # what routing sees: the window is held
    hits_before = engine.block_manager.stats_hit_blocks
    assert _bounded_run(llm, [prompt], 8) == [hf_greedy(path, prompt, 8, eos_ids=())]
    assert engine.block_manager.stats_hit_blocks == hits_before + 9  # 144 tokens not computed
    engine.check_integrity()
