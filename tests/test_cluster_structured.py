"""Structured output, logit_bias and honest refusals through a live cluster, aggregated and 1P+1D:
the official client's `parse` with a Pydantic model on the default model, regex and choice, the
same text over gRPC, logit_bias forcing and forbidding tokens. Under disaggregation the prefill
worker samples the first token under the grammar and the decode worker's matcher continues from
it; a migrated structured stream (decode worker SIGKILLed) resumes its matcher from the streamed
tokens and ends equal to the engine alone."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any, Literal

import aiohttp
import grpc
import jsonschema
import openai
import pydantic
import pytest

from engine import SamplingParams
from engine.llm import LLM
from engine.structured_output import StructuredOutput
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import Cluster, assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.migration import stream_through_kill

pytestmark = pytest.mark.slow

CONFIGS = {"aggregated": ("--prefill", "0", "--decode", "0", "--both", "1"),
           "1P+1D": ("--prefill", "1", "--decode", "1", "--min-remote-prefill-tokens", "4")}
SUBJECTS = ["a baker", "a sailor", "a poet", "a nurse", "a judge", "a miner", "a diver", "a clown", "a monk",
            "a spy", "a king", "a smith", "a tailor", "a guard", "a cook", "a scout", "a nun", "a bard",
            "a thief", "a mayor"]


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = pydantic.Field(max_length=12)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int
    job: Literal["farmer", "doctor", "artist", "other"]
    pets: list[Pet] = pydantic.Field(max_length=2)
    retired: bool


@pytest.fixture(scope="module", params=list(CONFIGS))
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[str, Cluster]]:
    with tandem_up(*CONFIGS[request.param], "--dtype", "float32", "--num-kv-blocks", "256") as running:
        yield request.param, running


def client_of(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)


async def test_parse_returns_a_valid_object_for_every_prompt(cluster: tuple[str, Cluster]) -> None:
    config, running = cluster
    async with client_of(running) as client:
        async def ask(subject: str) -> Person | None:
            completion = await client.chat.completions.parse(
                model="", messages=[{"role": "user", "content": f"Invent {subject} as JSON."}],
                response_format=Person, temperature=0, max_tokens=150)
            assert completion.choices[0].finish_reason == "stop"
            return completion.choices[0].message.parsed
        people = await asyncio.gather(*(ask(s) for s in SUBJECTS))
    assert all(isinstance(p, Person) for p in people), people
    if config == "1P+1D":  # the first token was sampled on the prefill worker, under the grammar
        decode = worker_metrics(running.role("decode")[0])
        assert metric(decode, "tandem_disaggregation_decisions_total", decision="remote") >= len(SUBJECTS)
    await assert_pools_clean(running)


async def test_regex_choice_and_logit_bias(cluster: tuple[str, Cluster]) -> None:
    _, running = cluster
    async with client_of(running) as client:
        async def text(prompt: str, stream: bool = False, **extra: object) -> str:
            if not stream:
                done = await client.completions.create(model="", prompt=prompt, max_tokens=16, temperature=0,
                                                       extra_body=extra)
                return done.choices[0].text
            chunks = await client.completions.create(model="", prompt=prompt, max_tokens=16, temperature=0,
                                                     stream=True, extra_body=extra)
            return "".join([c.choices[0].text async for c in chunks if c.choices])
        phone = await text("My phone number is", guided_regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}")
        assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", phone), phone
        answer = await text("Is water wet? Answer:", stream=True, guided_choice=["yes", "no", "it depends"])
        assert answer in ("yes", "no", "it depends")
        assert await text("Count:", structured_outputs={"choice": ["one two", "three"]}) in ("one two", "three")
        forced = await client.completions.create(model="", prompt="Hello", max_tokens=3, temperature=0,
                                                 logit_bias={"1234": 100})
        assert forced.choices[0].text == (await _post(running, "/detokenize", {"tokens": [1234] * 3}))["prompt"]
        tok = await client.completions.create(model="", prompt="Hello", max_tokens=1, temperature=0, logprobs=2)
        assert tok.choices[0].logprobs is not None and tok.choices[0].logprobs.top_logprobs is not None
        ranked = sorted(tok.choices[0].logprobs.top_logprobs[0].items(), key=lambda kv: -kv[1])
        assert tok.choices[0].text == ranked[0][0]
        ids = (await _post(running, "/tokenize", {"prompt": ranked[0][0], "add_special_tokens": False}))["tokens"]
        forbidden = await client.completions.create(model="", prompt="Hello", max_tokens=1, temperature=0,
                                                    logit_bias={str(ids[0]): -100})
        assert forbidden.choices[0].text == ranked[1][0]  # the runner-up
    await assert_pools_clean(running)


async def _post(running: Cluster, path: str, body: dict[str, object]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{running.http_url}{path}", json=body) as reply:
        assert reply.status == 200, await reply.text()
        return dict(await reply.json())


async def test_grpc_structured_output_equals_http(cluster: tuple[str, Cluster]) -> None:
    _, running = cluster
    schema = Person.model_json_schema()
    prompt = "Invent a farmer as JSON."
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=120,
                                     structured=pb.StructuredOutput(json_schema=json.dumps(schema)))
    async with client_of(running) as client, grpc.aio.insecure_channel(running.grpc_address) as channel:
        async def over_grpc() -> list[pb.GenerateResponse]:
            return [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(text=prompt, sampling=sampling), timeout=120)]
        http, chunks = await asyncio.gather(  # together: one batch
            client.completions.create(model="", prompt=prompt, max_tokens=120, temperature=0,
                                      extra_body={"guided_json": schema}), over_grpc())
    assert "".join(c.text for c in chunks) == http.choices[0].text
    Person.model_validate_json(http.choices[0].text)


async def test_several_prompts_give_one_choice_each(cluster: tuple[str, Cluster]) -> None:
    """A completions request of several prompts: choice i equals prompt i asked alone (greedy), whole
    and streamed; usage is the sum; text_offset walks the tokens' text."""
    _, running = cluster
    prompts = ["The capital of France is", "1, 2, 3,", "Roses are red,"]
    async with client_of(running) as client:
        alone = [await client.completions.create(model="", prompt=p, max_tokens=8, temperature=0) for p in prompts]
        together = await client.completions.create(model="", prompt=prompts, max_tokens=8, temperature=0, logprobs=0)
        assert [c.index for c in together.choices] == [0, 1, 2]
        assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
        assert together.usage is not None
        assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone if a.usage)
        for choice in together.choices:
            assert choice.logprobs is not None and choice.logprobs.tokens and choice.logprobs.text_offset
            tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
            assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        stream = await client.completions.create(model="", prompt=prompts, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        texts, ids, usage = ["", "", ""], set(), None
        async for chunk in stream:
            ids.add(chunk.id)
            for c in chunk.choices:
                texts[c.index] += c.text
            usage = chunk.usage or usage
        assert texts == [a.choices[0].text for a in alone] and len(ids) == 1
        assert usage is not None and usage.completion_tokens == together.usage.completion_tokens
    await assert_pools_clean(running)


async def test_n_choices_prefill_once(cluster: tuple[str, Cluster]) -> None:
    """n = 4: four choices; greedy ones are equal, seeded ones the same on every run. Choices 1..3
    start from the prompt's KV that choice 0 left on its decode worker (the prefix cache serves
    their full blocks), so under disaggregation one remote prefill serves all four."""
    config, running = cluster
    messages = [{"role": "user", "content": "Write one sentence about the sea and the wind."}]
    decode = running.role("decode" if config == "1P+1D" else "both")[0]
    remote_before = metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote") \
        if config == "1P+1D" else 0.0
    cached_before = metric(worker_metrics(decode), "tandem_prefill_tokens_total", kind="cached")
    async with client_of(running) as client:
        greedy = await client.chat.completions.create(model="", messages=messages, n=4, temperature=0,  # type: ignore[arg-type]
                                                      max_tokens=12)
        assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
        assert len({c.message.content for c in greedy.choices}) == 1
        assert greedy.usage is not None  # the prompt counted once, the completions summed
        assert greedy.usage.completion_tokens == 4 * 12 or greedy.choices[0].finish_reason == "stop"
        cached = metric(worker_metrics(decode), "tandem_prefill_tokens_total", kind="cached") - cached_before
        full_blocks = greedy.usage.prompt_tokens // 16 * 16
        assert cached >= 3 * full_blocks > 0, (cached, greedy.usage.prompt_tokens)
        if config == "1P+1D":  # a prompt new to the cluster: one remote prefill for the four choices
            remote = metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote")
            assert remote - remote_before == 1
        runs = []
        for _ in range(2):
            sampled = await client.chat.completions.create(model="", messages=messages, n=4, temperature=1.0,  # type: ignore[arg-type]
                                                           seed=7, max_tokens=12, stream=True)
            texts = ["", "", "", ""]
            async for chunk in sampled:
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
            runs.append(texts)
        assert runs[0] == runs[1] and all(runs[0])
        cut = await client.chat.completions.create(model="", messages=messages, n=4, temperature=1.0,  # type: ignore[arg-type]
                                                   max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        seen: set[int] = set()
        async for chunk in cut:  # the client leaves once every choice streams: all four are cancelled
            seen |= {c.index for c in chunk.choices if c.delta.content}
            if len(seen) == 4:
                break
        await cut.close()
        assert seen == {0, 1, 2, 3}
    await assert_pools_clean(running)  # no block left behind by completed or cancelled choices


@pytest.fixture(scope="module")
def engine_alone(default_model_path) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(default_model_path), dtype="float32")


ECHOED = "The quick brown fox jumps over the lazy dog, and then"


async def test_echo_scores_the_prompt_as_the_engine_does(cluster: tuple[str, Cluster], engine_alone: LLM) -> None:
    """echo + logprobs with max_tokens 0 (how evaluation harnesses score a text): the prompt's
    logprobs, computed on the prefill worker under disaggregation, equal the engine's own; with
    tokens generated, whole and streamed, the prompt comes first and text_offset walks both."""
    config, running = cluster
    scored = engine_alone.generate([ECHOED], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2))[0]
    ids = scored.prompt_token_ids
    texts = [engine_alone.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    decode = running.role("decode" if config == "1P+1D" else "both")[0]
    remote_before = metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote")
    async with client_of(running) as client:
        done = await client.completions.create(model="", prompt=ECHOED, echo=True, logprobs=2, max_tokens=0)
        choice = done.choices[0]
        assert choice.text == ECHOED and choice.finish_reason == "length"
        assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), 0)
        lp = choice.logprobs
        assert lp is not None and lp.tokens == texts and lp.token_logprobs and lp.top_logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in scored.prompt_logprobs[1:]], abs=1e-3)
        for got, want in zip(lp.top_logprobs[1:], scored.prompt_logprobs[1:], strict=True):
            assert list(got) == [engine_alone.tokenizer.decode([t], skip_special_tokens=False) for t, _ in want.top]
        assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        if config == "1P+1D":  # the prefill worker scored the prompt, and the handoff carried the scores
            decisions = worker_metrics(decode)
            assert metric(decisions, "tandem_disaggregation_decisions_total", decision="remote") == remote_before + 1
            assert metric(decisions, "tandem_disaggregation_decisions_total", decision="fallback") == 0
        plain = await client.completions.create(model="", prompt=ECHOED, max_tokens=4, temperature=0)
        stream = await client.completions.create(model="", prompt=ECHOED, echo=True, logprobs=0, max_tokens=4,
                                                 temperature=0, stream=True)
        text, tokens, offsets = "", [], []
        async for chunk in stream:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs is not None:
                tokens += chunk.choices[0].logprobs.tokens or []
                offsets += chunk.choices[0].logprobs.text_offset or []
        assert text == ECHOED + plain.choices[0].text and tokens[:len(ids)] == texts
        assert len(tokens) == len(ids) + 4 and offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    async with grpc.aio.insecure_channel(running.grpc_address) as channel:  # gRPC: prompt_logprobs in the first chunk
        chunks = [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            text=ECHOED, sampling=pb.SamplingParameters(temperature=0, max_tokens=3, prompt_logprobs=2)), timeout=120)]
    assert [len(c.prompt_logprobs) for c in chunks] == [len(ids) - 1] + [0] * (len(chunks) - 1)
    assert [p.token_id for p in chunks[0].prompt_logprobs] == ids[1:]
    assert [p.logprob for p in chunks[0].prompt_logprobs] == pytest.approx(
        [e.logprob for e in scored.prompt_logprobs[1:]], abs=1e-3)
    await assert_pools_clean(running)


async def test_best_of_returns_the_most_likely_choices(cluster: tuple[str, Cluster]) -> None:
    """best_of 4, n 2, seeded: the two of the four seeded samples (the same four that n=4 gives) with
    the highest sum of token logprobs, best first; their logprobs stay hidden unless asked for."""
    _, running = cluster
    ask = {"model": "", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 11}
    async with client_of(running) as client:
        four = await client.completions.create(**ask, n=4, logprobs=0)  # type: ignore[call-overload]
        best = await client.completions.create(**ask, n=2, best_of=4)  # type: ignore[call-overload]
    ranked = sorted(four.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert best.usage is not None and four.usage is not None
    assert best.usage.completion_tokens == four.usage.completion_tokens  # every choice generated counts
    await assert_pools_clean(running)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 20}}}}}


async def _call_tools(client: openai.AsyncOpenAI, messages: list[dict[str, object]], stream: bool,
                      **options: object) -> tuple[str | None, list[dict[str, str]], str | None]:
    """(content, tool calls as {id, name, arguments}, finish reason), streamed deltas assembled."""
    if not stream:
        done = await client.chat.completions.create(model="", messages=messages, temperature=0,  # type: ignore[call-overload]
                                                    max_tokens=120, **options)
        message = done.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in message.tool_calls or ()]
        return message.content, calls, done.choices[0].finish_reason
    chunks = await client.chat.completions.create(model="", messages=messages, temperature=0,  # type: ignore[call-overload]
                                                  max_tokens=120, stream=True, **options)
    content, calls, reason = "", [], None
    async for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or ():
            calls.append({"id": c.id, "name": c.function.name, "arguments": c.function.arguments})
        reason = chunk.choices[0].finish_reason or reason
    return content, calls, reason


@pytest.mark.parametrize("choice", ["required", "named"])
async def test_a_tool_round_trip(cluster: tuple[str, Cluster], choice: str) -> None:
    """tools → a forced call whose arguments match the schema → the tool's result as a `tool` turn →
    a final answer, on the default model; streamed and not (the two round trips run together)."""
    _, running = cluster
    tool_choice: object = "required" if choice == "required" else {"type": "function",
                                                                     "function": {"name": "get_weather"}}

    async def round_trip(client: openai.AsyncOpenAI, stream: bool) -> None:
        messages: list[dict[str, object]] = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        content, calls, reason = await _call_tools(client, messages, stream, tools=[WEATHER, CLOCK],
                                                   tool_choice=tool_choice, parallel_tool_calls=False)
        assert reason == ("tool_calls" if choice == "required" else "stop")  # OpenAI's for a named function
        assert len(calls) == 1 and not content
        assert calls[0]["name"] in ("get_weather", "get_time") and calls[0]["id"].startswith("call_")
        schema = (WEATHER if calls[0]["name"] == "get_weather" else CLOCK)["function"]["parameters"]
        jsonschema.validate(json.loads(calls[0]["arguments"]), schema)
        messages += [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": calls[0]["id"], "type": "function",
                          "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
                     {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18 degrees and sunny"}]
        answer, more_calls, reason = await _call_tools(client, messages, stream, tools=[WEATHER, CLOCK])
        assert reason in ("stop", "length", "tool_calls")
        assert answer or more_calls

    async with client_of(running) as client:
        await asyncio.gather(round_trip(client, stream=False), round_trip(client, stream=True))
    await assert_pools_clean(running)


async def test_grpc_tool_calls_equal_http(cluster: tuple[str, Cluster]) -> None:
    """Over gRPC, tool_choice required and a named function give the same calls as HTTP (greedy),
    in the last chunk, with no text; none leaves the tools out of the prompt."""
    _, running = cluster
    messages = [{"role": "user", "content": "What is the weather in Oslo, and the time in Tokyo?"}]
    definitions = [pb.ToolDefinition(name=t["function"]["name"], description=t["function"]["description"],
                                     parameters=json.dumps(t["function"]["parameters"])) for t in (WEATHER, CLOCK)]
    choices = {"required": (pb.ToolChoice(mode="required"), "required"),
               "named": (pb.ToolChoice(function="get_time"), {"type": "function", "function": {"name": "get_time"}}),
               "none": (pb.ToolChoice(mode="none"), "none")}
    async with client_of(running) as client, grpc.aio.insecure_channel(running.grpc_address) as channel:
        async def over_grpc(choice: pb.ToolChoice, max_tokens: int) -> list[pb.GenerateResponse]:
            return [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=messages[0]["content"])],
                                  tools=definitions, tool_choice=choice, parallel_tool_calls=False),
                sampling=pb.SamplingParameters(temperature=0, max_tokens=max_tokens)), timeout=120)]
        for name, (grpc_choice, http_choice) in choices.items():
            limit = 30 if name == "none" else 200  # free text (none) need not run long
            http, chunks = await asyncio.gather(  # together: one batch
                client.chat.completions.create(model="", messages=messages, tools=[WEATHER, CLOCK],  # type: ignore[list-item]
                                               tool_choice=http_choice, temperature=0, max_tokens=limit,
                                               parallel_tool_calls=False), over_grpc(grpc_choice, limit))
            got = [(c.name, json.loads(c.arguments)) for c in chunks[-1].tool_calls]
            calls = http.choices[0].message.tool_calls or ()
            want = [(c.function.name, json.loads(c.function.arguments)) for c in calls]  # type: ignore[union-attr]
            assert got == want, (name, chunks[-1].finish_reason)
            assert all(not c.tool_calls for c in chunks[:-1])
            assert chunks[-1].usage.prompt_tokens == (http.usage.prompt_tokens if http.usage else -1)
            if name == "none":
                assert not got and "".join(c.text for c in chunks) == http.choices[0].message.content
            else:
                assert got and not "".join(c.text for c in chunks)
    await assert_pools_clean(running)


async def test_tools_render_into_the_prompt(cluster: tuple[str, Cluster]) -> None:
    """The tools reach the prompt (SmolLM2's template knows none: Hermes turns), as /tokenize shows."""
    _, running = cluster
    messages = [{"role": "user", "content": "Weather in Lima?"}]
    bare = (await _post(running, "/tokenize", {"messages": messages}))["count"]
    with_tools = (await _post(running, "/tokenize", {"messages": messages, "tools": [WEATHER]}))["count"]
    assert with_tools > bare + 40
    async with client_of(running) as client:
        done = await client.chat.completions.create(model="", messages=messages, tools=[WEATHER],  # type: ignore[list-item]
                                                    max_tokens=1)
    assert done.usage is not None and done.usage.prompt_tokens == with_tools


@pytest.mark.parametrize(("body", "field"), [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"n": 65}, "'n'"),
    ({"suffix": "x"}, "suffix"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "json_schema"),
    ({"guided_regex": "a(b"}, "regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "twice"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
])
async def test_refusals_name_the_field_and_the_worker_stays_up(cluster: tuple[str, Cluster],
                                                               body: dict[str, object], field: str) -> None:
    _, running = cluster
    async with client_of(running) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2, extra_body=body)
        assert field in str(refused.value)
        ok = await client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)
        assert ok.choices[0].finish_reason == "length"


async def test_a_migrated_structured_stream_resumes_its_grammar(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    """The tiny random model writes a long JSON object; its decode worker dies mid-stream; the
    survivor replays the streamed tokens through a fresh matcher and ends exactly as the engine alone."""
    streams, max_tokens = 3, 120
    prompts = [[(13 * i + 5 * s) % 400 + 5 for i in range(12 + s)] for s in range(streams)]
    schema = {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {"items": {
        "type": "array", "maxItems": 25, "items": {"type": "integer", "minimum": 0, "maximum": 99}}}}
    structured = StructuredOutput("json_schema", json.dumps(schema))
    params = SamplingParams.greedy(max_tokens=max_tokens, structured=structured)
    # --deterministic: the survivor recomputes prompt + streamed tokens as one prefill, where the victim decoded
    # them one by one; batch invariance keeps the random model's near-ties (among the allowed tokens) exact
    expected = LLM(str(tiny_llama_dir), dtype="float32", deterministic=True).generate(prompts, params)
    assert all(len(e.token_ids) > 10 and e.finish_reason == "stop" for e in expected), [e.text for e in expected]
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens,
                                     structured=pb.StructuredOutput(json_schema=json.dumps(schema)))
    with tandem_up("--prefill", "1", "--decode", "2", "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--deterministic", "true", "--min-remote-prefill-tokens", "4", "--policy", "round_robin",
                   "--num-kv-blocks", "256") as cluster:
        victim = cluster.role("decode")[0]
        requests = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=sampling) for p in prompts]
        received = await stream_through_kill(cluster.grpc_address, requests, victim.pid)
        assert all(r.cut < len(e.token_ids) for r, e in zip(received, expected, strict=True)), received
        for i, (got, want) in enumerate(zip(received, expected, strict=True)):
            assert got.token_ids == want.token_ids, f"stream {i} (cut at {got.cut})"
            assert got.text == want.text
            assert len(json.loads(got.text)["items"]) <= 25
        cluster.workers.remove(victim)
        survivor = worker_metrics(cluster.role("decode")[0])
        assert metric(survivor, "tandem_disaggregation_decisions_total", decision="local_resume") >= 1
        await assert_pools_clean(cluster)
