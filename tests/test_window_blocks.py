"""A model whose every layer has a sliding window gives back the blocks its windows have left behind
(engine.scheduler): fewer blocks held for the same output, cached ones still found by the prefix cache,
pools whole. A model with a global layer keeps every block."""

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


def test_a_model_with_a_global_layer_keeps_every_block(tiny_qwen2_window_dir: pathlib.Path,
                                                       tiny_gemma2_dir: pathlib.Path) -> None:
    for path in (tiny_qwen2_window_dir, tiny_gemma2_dir):
        llm = LLM(str(path), num_kv_blocks=64, dtype="float32")
        assert llm.engine.scheduler.window == 0
        llm.generate([[7] * 100], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        assert llm.engine.scheduler.num_blocks_behind_window_total == 0
