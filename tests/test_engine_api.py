"""Public API behaviour: outputs, bad input, prefix caching, aborts, streaming, async engine."""

from __future__ import annotations

import asyncio

import pytest

from engine import LLM, AsyncEngine, InvalidRequestError, ModelLoadError, SamplingParams
from tests.support.prompts import text_of_about

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def llm(default_model_path) -> LLM:
    return LLM(str(default_model_path), num_kv_blocks=256, max_model_len=2048)


@pytest.fixture(scope="module")
def llm_fp32(default_model_path) -> LLM:
    """For tests that compare outputs across batch shapes (a cached prefix, another batch): in bf16,
    oneDNN's kernels on CPUs with AMX round differently by batch shape, which flips near-ties."""
    return LLM(str(default_model_path), num_kv_blocks=256, max_model_len=2048, dtype="float32")


@pytest.fixture(autouse=True)
def pool_intact_after_each_test(request):
    yield
    for name in ("llm", "llm_fp32"):
        if name in request.fixturenames:
            engine = request.getfixturevalue(name).engine
            assert not engine.has_unfinished_requests()
            engine.check_integrity()


def test_generate_outputs_in_order_with_text(llm: LLM) -> None:
    outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Say hello."}]], SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in outs[0].text
    assert outs[0].finish_reason == "stop" and outs[0].token_ids[-1] in llm.tokenizer.eos_token_ids
    for out in outs:
        assert out.text == llm.tokenizer.decode(out.token_ids)
    single = llm.generate("Once upon a time", GREEDY)
    assert len(single) == 1 and len(single[0].token_ids) == 8 and single[0].finish_reason == "length"


def test_token_id_prompts_equal_text_prompts(llm: LLM) -> None:
    ids = llm.tokenizer.encode("The quick brown fox")
    a, b = llm.generate(["The quick brown fox", ids], GREEDY)
    assert a.token_ids == b.token_ids and a.prompt_token_ids == ids


@pytest.mark.parametrize(("prompt", "params", "needle"), [
    ("", GREEDY, "empty"),
    ([], GREEDY, "empty"),
    ("x " * 3000, GREEDY, "shorten"),
    ([10**9], GREEDY, "vocabulary"),
    (["a", 1], GREEDY, "token ids"),
    ("fine", SamplingParams(stop_token_ids=[10**6]), "stop token id"),
])
def test_bad_prompts_are_refused_and_leak_nothing(llm: LLM, prompt, params, needle) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        llm.generate([prompt], params)


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
                                    {"top_k": -2}])
def test_bad_sampling_params_raise_value_error(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_model_paths(tmp_path) -> None:
    with pytest.raises(ModelLoadError):
        LLM(str(tmp_path / "nope"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError):
        LLM(str(corrupt))


def test_one_bad_request_in_a_batch_loses_nothing(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine prompt", ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(["fine prompt"], GREEDY)[0].finish_reason == "length"


def test_prefix_cache_computes_only_new_tokens(llm_fp32: LLM) -> None:
    llm = llm_fp32
    llm.engine.reset_prefix_cache()
    shared = text_of_about(llm.tokenizer, 600, seed=11)
    first = llm.generate([[*shared, 2000, 3000]], GREEDY)[0]
    engine = llm.engine
    before = engine.num_computed_tokens_total
    second_prompt = [*shared, 4000, 5000, 6000]
    second = llm.generate([second_prompt], GREEDY)[0]
    computed = engine.num_computed_tokens_total - before
    block = engine.config.block_size
    cached = len(shared) // block * block
    assert second.num_cached_tokens == cached
    # New prompt tokens plus one decode step per generated token after the first.
    assert computed == len(second_prompt) - cached + len(second.token_ids) - 1
    assert first.num_cached_tokens == 0
    llm.engine.reset_prefix_cache()
    uncached = llm.generate([second_prompt], GREEDY)[0]
    assert uncached.token_ids == second.token_ids


def test_seeded_sampling_is_reproducible(llm_fp32: LLM) -> None:
    llm = llm_fp32
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    a = llm.generate(["Tell me a story"], params)[0]
    b = llm.generate(["Something else", "Tell me a story", "More"], [GREEDY, params, params])[1]
    assert a.token_ids == b.token_ids


def test_stop_strings_and_stop_tokens(llm: LLM) -> None:
    base = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=16))[0]
    target = base.text[4:9]
    out = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=16, stop=[target]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert target not in out.text and base.text.startswith(out.text)
    tok = base.token_ids[3]
    out = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tok]))[0]
    first = base.token_ids.index(tok)
    assert out.token_ids == base.token_ids[:first + 1] and out.stop_reason == tok


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(engine.make_request("a", "The history of Rome", SamplingParams(temperature=0, max_tokens=100)))
    engine.add_request(engine.make_request("b", "The history of Greece", SamplingParams(temperature=0, max_tokens=100)))
    for _ in range(3):
        engine.step()
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.finish_reason == "abort"
    assert engine.abort_request("a") is None
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()


def test_streaming_deltas_add_up(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(engine.make_request("s", [1, 9690, 2], SamplingParams(temperature=0.8, seed=3, max_tokens=40)))
    text, ids = "", []
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.new_text
            ids += out.new_token_ids
            final = out
    assert final is not None and final.finished
    assert text == final.text and ids == final.token_ids


async def test_async_engine_streams_and_cancels(default_model_path) -> None:
    engine = AsyncEngine(engine=LLM(str(default_model_path), num_kv_blocks=128).engine)
    try:
        params = SamplingParams(temperature=0, max_tokens=12)
        stream = await engine.add_request(engine.make_request("x", "Hello, my name is", params))
        chunks = [out async for out in stream]
        assert chunks[-1].finished and len(chunks[-1].token_ids) == 12
        assert "".join(c.new_text for c in chunks) == chunks[-1].text

        async def consume_two() -> None:
            long = SamplingParams(temperature=0, max_tokens=500)
            stream = await engine.add_request(engine.make_request("y", "A long story:", long))
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 2:
                    break
            await stream.aclose()

        await consume_two()
        results = await asyncio.gather(*(engine.generate(engine.make_request(f"g{i}", f"Question {i}:", GREEDY))
                                         for i in range(4)))
        assert all(r.finished for r in results)
        with pytest.raises(InvalidRequestError):
            engine.make_request("bad", "", GREEDY)
        for _ in range(100):  # the abort of "y" is applied by the engine thread
            if (await engine.status()).stats.running == 0:
                break
            await asyncio.sleep(0.05)
        status = await engine.status()
        assert status.stats.running == status.stats.waiting == 0 and status.integrity_error is None
    finally:
        engine.shutdown()
