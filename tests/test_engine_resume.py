"""Resuming a request another engine was generating (request migration, engine side): with the tokens
already streamed, a fresh engine continues exactly where the lost one stopped — same tokens, same text,
same finish — and never emits a streamed token or character again (engine/llm_engine.py)."""

from __future__ import annotations

import asyncio

import pytest

from engine import AsyncEngine, EngineConfig, InvalidRequestError, LLMEngine, SamplingParams

PROMPT = [(7 * i) % 90 + 5 for i in range(21)]


def new_engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4, dtype="float32"))


def stream(engine: LLMEngine, params: SamplingParams, resume: list[int] | None = None
           ) -> tuple[list[tuple[list[int], str]], str | None]:
    """The chunks (new token ids, new text) one request streams, and its finish reason."""
    engine.add_request(engine.make_request("r", PROMPT, params, resume_token_ids=resume))
    chunks: list[tuple[list[int], str]] = []
    reason = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            chunks.append((out.new_token_ids, out.new_text))
            reason = out.finish_reason
            if out.finished:
                assert len(out.token_ids) == len(resume or []) + sum(len(c[0]) for c in chunks)
    return chunks, reason


CASES = {
    "greedy": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    # a stop string that never occurs still holds text back from the stream
    "greedy_holdback": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=["\x00never\x00"]),
    "seeded_penalties": SamplingParams(max_tokens=24, temperature=0.9, top_k=40, seed=1234, ignore_eos=True,
                                       repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
    "min_tokens": SamplingParams(max_tokens=24, min_tokens=18, temperature=0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_any_chunk_continues_the_stream_exactly(tiny_llama_dir, case: str) -> None:
    params = CASES[case]
    engine = new_engine(tiny_llama_dir)
    reference, reason = stream(engine, params)
    all_tokens = [t for ids, _ in reference for t in ids]
    all_text = "".join(text for _, text in reference)
    assert len(reference) > 3
    for cut in (1, 2, len(reference) // 2, len(reference) - 1):
        streamed = [t for ids, _ in reference[:cut] for t in ids]
        shown = "".join(text for _, text in reference[:cut])
        fresh = new_engine(tiny_llama_dir)  # the engine the request migrates to: nothing cached
        rest, rest_reason = stream(fresh, params, resume=streamed)
        assert streamed + [t for ids, _ in rest for t in ids] == all_tokens, f"cut after chunk {cut}"
        assert shown + "".join(text for _, text in rest) == all_text, f"cut after chunk {cut}"
        assert rest_reason == reason
        fresh.check_integrity()
        assert fresh.block_manager.num_free_blocks == fresh.block_manager.num_blocks


def test_resume_with_a_stop_string_ahead_stops_at_the_same_place(tiny_llama_dir) -> None:
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    text = "".join(t for _, t in stream(new_engine(tiny_llama_dir), greedy)[0])
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop.strip()) == 3, f"pick another slice of {text!r}"
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    reference, reason = stream(new_engine(tiny_llama_dir), params)
    assert reason == "stop"
    cut = 2
    rest, rest_reason = stream(new_engine(tiny_llama_dir), params, [t for ids, _ in reference[:cut] for t in ids])
    assert "".join(t for _, t in reference[:cut]) + "".join(t for _, t in rest) == "".join(t for _, t in reference)
    assert rest_reason == "stop"


def test_a_resume_that_cannot_continue_is_refused(tiny_llama_dir) -> None:
    engine = new_engine(tiny_llama_dir)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request(engine.make_request("a", PROMPT, params, resume_token_ids=[5, 6, 7, 8]))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request(engine.make_request("b", PROMPT, params, resume_token_ids=[5, 10**6]))
    eos = engine.tokenizer.eos_token_ids
    assert eos
    with pytest.raises(InvalidRequestError, match="nothing to resume"):
        engine.add_request(engine.make_request("c", PROMPT, SamplingParams(max_tokens=8, temperature=0.0),
                                               resume_token_ids=[5, min(eos)]))
    assert not engine.requests and not engine.has_unfinished_requests()
    engine.check_integrity()


def test_async_engine_refuses_a_bad_resume_before_any_stream(tiny_llama_dir) -> None:
    async def main() -> None:
        engine = AsyncEngine(engine=new_engine(tiny_llama_dir))
        try:
            with pytest.raises(InvalidRequestError, match="max_tokens"):
                engine.make_request("a", PROMPT, SamplingParams(max_tokens=2), resume_token_ids=[5, 6])
            greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            out = await engine.generate(engine.make_request("b", PROMPT, greedy))
            assert len(out.token_ids) == 3
        finally:
            engine.shutdown()
    asyncio.run(main())


def test_resume_where_the_generated_tokens_are_cached_counts_only_the_prompt(tiny_llama_dir) -> None:
    """A migration target that served the same request before holds prompt + output blocks in its
    prefix cache: the resumed request reuses them, but its cached-token usage stays within the prompt."""
    params = CASES["greedy"]
    engine = new_engine(tiny_llama_dir)
    reference, _ = stream(engine, params)  # leaves prompt + output blocks cached
    streamed = [t for ids, _ in reference[:12] for t in ids]
    engine.add_request(engine.make_request("again", PROMPT, params, resume_token_ids=streamed))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == "again"]
    assert streamed + outputs[-1].token_ids[len(streamed):] == [t for ids, _ in reference for t in ids]
    assert 0 < outputs[-1].num_cached_tokens <= len(PROMPT)
