"""Async scheduling (engine.step_pipeline): the next step is scheduled while the current one runs, and the
outputs are exactly the plain step's, through end and stop tokens, stop strings found a step late, the length
limit, seeded sampling, logprobs, chunked prefill, preemption of a sequence whose step is in flight, and aborts.
The model is the tiny fp32 Llama, whose rows do not depend on their batch here, so any change of a token is a
bug, not rounding (a sequence about to end still takes a place in the next step)."""

from __future__ import annotations

import asyncio
import pathlib
from dataclasses import dataclass

import pytest

from engine import AsyncEngine, SamplingParams
from engine.config import EngineConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.loader.engine_parts import LoadedEngineParts
from engine.outputs import RequestOutput

PROMPTS = [[5, 9, 13, 2], [7] * 30, [3, 1, 4, 1, 5, 9, 2, 6], [11, 12], list(range(20, 70)), [8, 8, 8]]


@dataclass(frozen=True)
class Final:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: object
    prompt_logprobs: object
    streamed_text: str
    streamed_ids: list[int]


def engine(tiny_llama_dir: pathlib.Path, async_scheduling: bool, parts: LoadedEngineParts | None = None,
           num_kv_blocks: int = 24) -> LLMEngine:
    config = EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=num_kv_blocks, block_size=4, dtype="float32",
                          max_num_batched_tokens=32, async_scheduling=async_scheduling)
    return LLMEngine(config, parts=parts)


def drive(engine: LLMEngine, work: list[tuple[str, list[int], SamplingParams]], abort_at: dict[int, str]
          ) -> dict[str, Final]:
    """Add every request, step until idle (aborting `abort_at[step]` before that step) and collect each request's
    final output with what its stream carried."""
    for request_id, prompt, params in work:
        engine.add_request(engine.make_request(request_id, prompt, params))
    chunks: dict[str, list[RequestOutput]] = {}
    for step in range(400):
        if not engine.has_unfinished_requests():
            break
        if step in abort_at:
            final = engine.abort_request(abort_at[step])
            assert final is not None and final.finish_reason == "abort"
            chunks.setdefault(final.request_id, []).append(final)
        for out in engine.step():
            chunks.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
    finals = {}
    for request_id, outs in chunks.items():
        last = outs[-1]
        assert last.finished and not any(o.finished for o in outs[:-1]), request_id
        finals[request_id] = Final(last.token_ids, last.text, last.finish_reason, last.stop_reason, last.logprobs,
                                   last.prompt_logprobs, "".join(o.new_text for o in outs),
                                   [t for o in outs for t in o.new_token_ids])
    return finals


def workload(probe: dict[str, Final]) -> list[tuple[str, list[int], SamplingParams]]:
    """Requests whose stops are taken from what the model wrote in a probe run, so each one really ends there."""
    written = probe["p0"].token_ids
    text = probe["p1"].text
    return [
        ("greedy", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24)),
        ("stop-token", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[written[6]])),
        ("stop-string", PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, stop=[text[len(text) // 2:][:3]])),
        ("seeded", PROMPTS[2], SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=20, logprobs=2)),
        ("one-token", PROMPTS[3], SamplingParams(temperature=0, max_tokens=1)),
        ("long-prompt", PROMPTS[4], SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1)),
        ("min-tokens", PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, min_tokens=10,
                                                  stop_token_ids=[written[2]])),
        ("aborted", PROMPTS[5], SamplingParams(temperature=0, max_tokens=40)),
        ("penalized", PROMPTS[5], SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.5,
                                                 logit_bias={4: 2.0})),
    ]


def test_async_steps_give_exactly_the_plain_steps_outputs(tiny_llama_dir: pathlib.Path) -> None:
    plain = engine(tiny_llama_dir, async_scheduling=False, num_kv_blocks=256)
    probe = drive(plain, [("p0", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24)),
                          ("p1", PROMPTS[1], SamplingParams(temperature=0, max_tokens=30))], {})
    work = workload(probe)
    expected = drive(plain, work, {6: "aborted"})  # the stops are met (the prefix cache is warm here: no baseline)
    assert expected["stop-token"].finish_reason == "stop" and expected["stop-string"].stop_reason is not None
    assert len(expected["min-tokens"].token_ids) >= 10
    # 16 blocks of 4 tokens for six more requests of 38 tokens: sequences are preempted, some while their step runs
    crowd = [(f"crowd-{i}", [*PROMPTS[2], i], SamplingParams(temperature=0, max_tokens=30)) for i in range(6)]
    for pool_blocks, requests in ((256, work), (16, work + crowd)):
        reference = engine(tiny_llama_dir, False, None, pool_blocks)  # fresh parts: the pool's size is theirs
        want = drive(reference, requests, {6: "aborted"})
        pipelined = engine(tiny_llama_dir, True, reference.parts, pool_blocks)
        assert pipelined.pipeline is not None
        got = drive(pipelined, requests, {6: "aborted"})
        for request_id, final in want.items():
            assert got[request_id] == final, request_id
            assert final.streamed_text == final.text and final.streamed_ids == final.token_ids
        if pool_blocks < 256:
            assert pipelined.pipeline.stats.preempted_in_flight > 0  # the case, not just preemption
        assert pipelined.pipeline.stats.overlapped_s > 0
        pipelined.close()


def test_async_scheduling_is_opt_in_and_refuses_speculation(tiny_llama_dir: pathlib.Path) -> None:
    default = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=16, dtype="float32"))
    assert default.pipeline is None  # measured slower on CPUs, where the host's work competes with the forward
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(async_scheduling=True, speculative=SpeculativeConfig())


def test_the_runner_refuses_inputs_that_still_await_a_token(tiny_llama_dir: pathlib.Path) -> None:
    pipelined = engine(tiny_llama_dir, True, num_kv_blocks=64)
    pipelined.add_request(pipelined.make_request("r", PROMPTS[0], SamplingParams(temperature=0, max_tokens=8)))
    pipelined.step()  # the prompt's step is in flight, the first decode step prepared
    prepared = pipelined.pipeline._prepared  # the state under test
    assert prepared is not None and prepared[1].awaited
    with pytest.raises(ValueError, match="fill_awaited"):
        pipelined.runner.execute_prepared(prepared[1])
    while pipelined.has_unfinished_requests():
        pipelined.step()
    pipelined.check_integrity()
    pipelined.close()


def test_async_engine_streams_aborts_and_checks_with_async_scheduling(tiny_llama_dir: pathlib.Path) -> None:
    async def scenario() -> None:
        params = SamplingParams(temperature=0, max_tokens=20)
        reference = engine(tiny_llama_dir, False, num_kv_blocks=64)
        want = drive(reference, [("a", PROMPTS[0], params), ("b", PROMPTS[2], params)], {})
        served = AsyncEngine(engine=engine(tiny_llama_dir, True, reference.parts, 64))
        try:
            results = await asyncio.gather(*(served.generate(served.make_request(rid, PROMPTS[i], params))
                                             for rid, i in (("a", 0), ("b", 2))))
            assert [r.token_ids for r in results] == [want["a"].token_ids, want["b"].token_ids]
            stream = await served.add_request(served.make_request("c", PROMPTS[1], SamplingParams(max_tokens=200,
                                                                                                 temperature=0)))
            seen, aborted, last = 0, False, None
            async for out in stream:
                seen += len(out.new_token_ids)
                last = out
                if seen >= 3 and not aborted:
                    aborted = await served.abort("c")
                    assert aborted
            assert last is not None and last.finish_reason == "abort"
            status = await served.status()
            assert status.integrity_error is None and status.stats.running == 0
        finally:
            served.shutdown()
    asyncio.run(scenario())


def test_a_failed_forward_leaves_a_state_a_retry_steps_from(tiny_llama_dir: pathlib.Path) -> None:
    """As after a failed plain step: the step's sequences are as before it, the next step() runs them again,
    and the request streams exactly the tokens it would have."""
    params = SamplingParams(temperature=0, max_tokens=6)
    reference = engine(tiny_llama_dir, False, num_kv_blocks=64)
    want = drive(reference, [("r", PROMPTS[0], params)], {})["r"].token_ids
    pipelined = engine(tiny_llama_dir, True, reference.parts, 64)
    pipelined.add_request(pipelined.make_request("r", PROMPTS[0], params))
    runner, failures, tokens = pipelined.runner, [], []
    run = runner.execute_prepared

    def failing_once(inputs):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(1)
            raise RuntimeError("the forward failed")
        return run(inputs)
    for call in range(60):
        if call == 2:  # the prompt's and the first decode step have run: the next launch fails
            runner.execute_prepared = failing_once  # type: ignore[method-assign]
        if not pipelined.has_unfinished_requests():
            break
        try:
            outputs = pipelined.step()
        except RuntimeError as exc:
            assert "forward failed" in str(exc)
            continue
        tokens += [t for out in outputs for t in out.new_token_ids]
    assert failures and not pipelined.has_unfinished_requests()
    pipelined.check_integrity()
    assert tokens == want
    pipelined.close()
