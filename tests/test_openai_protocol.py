"""OpenAI request bodies → tandem.v1 GenerateRequest, refusals with clear messages, and our response
chunks → OpenAI-shaped objects (cluster/openai_protocol.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.json_body import decode_json
from cluster.openai_protocol import (
    BadRequest,
    OpenAIRequest,
    PromptEcho,
    ResponseBuilder,
    parse_chat,
    parse_completion,
)
from tandem.v1 import inference_pb2 as pb


def completion(**body: Any) -> OpenAIRequest:
    return parse_completion({"model": "m", "prompt": "Hello", **body})


def chat(**body: Any) -> OpenAIRequest:
    return parse_chat({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **body})


# -- prompts and messages ----------------------------------------------------------------------------
def test_string_prompt_becomes_text() -> None:
    """A string prompt fills GenerateRequest.text; model and kind are kept."""
    parsed = completion(prompt="Once upon a time")
    assert parsed.kind == "completion"
    assert parsed.model == "m"
    assert parsed.generate.model == "m"
    assert parsed.generate.WhichOneof("input") == "text"
    assert parsed.generate.text == "Once upon a time"


def test_token_id_prompt_becomes_token_ids() -> None:
    """A list of ints fills GenerateRequest.token_ids.ids."""
    parsed = completion(prompt=[5, 6, 7])
    assert parsed.generate.WhichOneof("input") == "token_ids"
    assert list(parsed.generate.token_ids.ids) == [5, 6, 7]


@pytest.mark.parametrize(("prompt", "field", "value"), [(["one"], "text", "one"), ([[1, 2]], "token_ids", [1, 2])])
def test_batch_of_one_prompt_is_unwrapped(prompt: list[Any], field: str, value: Any) -> None:
    """A batch holding a single prompt (string or token ids) is that prompt."""
    generate = completion(prompt=prompt).generate
    assert generate.WhichOneof("input") == field
    assert (generate.text if field == "text" else list(generate.token_ids.ids)) == value


def test_chat_messages_with_string_or_text_part_content() -> None:
    """Chat content may be a string or a list of text parts, which are joined."""
    parsed = parse_chat({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]})
    assert parsed.kind == "chat"
    assert parsed.generate.WhichOneof("input") == "chat"
    messages = [(m.role, m.content) for m in parsed.generate.chat.messages]
    assert messages == [("system", "Be brief."), ("user", "Hello, world")]


def test_request_id_timeout_and_priority_are_carried() -> None:
    """request_id, timeout (seconds) and priority map onto the GenerateRequest."""
    generate = completion(request_id="abc", timeout=2, priority=-3).generate
    assert generate.request_id == "abc"
    assert generate.HasField("timeout_seconds") and generate.timeout_seconds == 2.0
    assert generate.priority == -3
    assert not completion().generate.HasField("timeout_seconds")


# -- sampling fields ---------------------------------------------------------------------------------
def test_sampling_fields_are_mapped() -> None:
    """temperature, top_p, top_k, seed, ignore_eos and penalties reach SamplingParameters."""
    s = completion(temperature=0.5, top_p=0.9, top_k=7, seed=42, ignore_eos=True, min_p=0.1, min_tokens=2,
                   presence_penalty=0.25, frequency_penalty=-0.5, repetition_penalty=1.5,
                   stop_token_ids=[9, 10]).generate.sampling
    assert s.temperature == pytest.approx(0.5)
    assert s.top_p == pytest.approx(0.9)
    assert s.top_k == 7
    assert s.seed == 42
    assert s.ignore_eos is True
    assert s.min_p == pytest.approx(0.1)
    assert s.min_tokens == 2
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.25, -0.5, 1.5)
    assert list(s.stop_token_ids) == [9, 10]


def test_unset_sampling_fields_stay_unset() -> None:
    """Fields the body omits are not set, so the engine's defaults apply."""
    s = completion().generate.sampling
    for name in ("temperature", "top_p", "top_k", "seed", "logprobs", "min_p"):
        assert not s.HasField(name), name
    assert s.ignore_eos is False
    assert list(s.stop) == []


def test_top_k_minus_one_means_unset() -> None:
    """vLLM's top_k = -1 (no top-k) leaves the field unset; other negatives are refused."""
    assert not completion(top_k=-1).generate.sampling.HasField("top_k")
    with pytest.raises(BadRequest, match="'top_k' must be >= 0"):
        completion(top_k=-2)


def test_integer_temperature_is_accepted() -> None:
    """JSON numbers without a fraction are fine where a float is expected."""
    assert completion(temperature=1).generate.sampling.temperature == 1.0


def test_max_tokens_defaults_to_16_for_completions_and_unset_for_chat() -> None:
    """Completions default to OpenAI's 16 tokens; chat leaves max_tokens to the context length."""
    assert completion().generate.sampling.max_tokens == 16
    assert not chat().generate.sampling.HasField("max_tokens")
    assert chat(max_tokens=5).generate.sampling.max_tokens == 5


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    """max_completion_tokens (the newer name) beats max_tokens when both are given."""
    assert completion(max_tokens=5, max_completion_tokens=9).generate.sampling.max_tokens == 9
    assert chat(max_completion_tokens=3).generate.sampling.max_tokens == 3


@pytest.mark.parametrize(("stop", "expected"), [("END", ["END"]), (["a", "bc"], ["a", "bc"]), (None, [])])
def test_stop_as_string_or_list(stop: Any, expected: list[str]) -> None:
    """stop may be one string or a list of strings."""
    assert list(completion(stop=stop).generate.sampling.stop) == expected


def test_completion_logprobs_is_an_integer() -> None:
    """Completions: logprobs N asks for N alternatives per token (0 is valid)."""
    parsed = completion(logprobs=3)
    assert parsed.logprobs == 3
    assert parsed.generate.sampling.logprobs == 3
    zero = completion(logprobs=0)
    assert zero.logprobs == 0 and zero.generate.sampling.HasField("logprobs")
    assert completion().logprobs is None


def test_chat_logprobs_is_a_flag_with_top_logprobs() -> None:
    """Chat: logprobs true asks for logprobs, top_logprobs for alternatives (default 0); false asks nothing."""
    parsed = chat(logprobs=True, top_logprobs=4)
    assert parsed.logprobs == 4 and parsed.generate.sampling.logprobs == 4
    assert chat(logprobs=True).logprobs == 0
    off = chat(logprobs=False, top_logprobs=4)
    assert off.logprobs is None and not off.generate.sampling.HasField("logprobs")


def test_stream_and_include_usage() -> None:
    """stream sets streaming; include_usage counts only when streaming."""
    assert (completion().stream, completion().include_usage) == (False, False)
    streamed = completion(stream=True, stream_options={"include_usage": True})
    assert (streamed.stream, streamed.include_usage) == (True, True)
    assert chat(stream=True).include_usage is False
    assert completion(stream=False, stream_options={"include_usage": True}).include_usage is False


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parse", [parse_completion, parse_chat])
@pytest.mark.parametrize("body", [[], "prompt", 3, None])
def test_body_must_be_an_object(parse: Any, body: Any) -> None:
    """A body that is not a JSON object is refused."""
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse(body)


@pytest.mark.parametrize(("body", "needle"), [
    ({}, "'prompt' must be a non-empty string, an array of token ids"),
    ({"prompt": []}, "'prompt' must be a non-empty string"),
    ({"prompt": None}, "'prompt' must be"),
    ({"prompt": 5}, "'prompt' must be"),
    ({"prompt": ["a"] * 65}, "at most 64 per request"),
    ({"prompt": ["a", ""]}, "'prompt' must be a non-empty string"),
    ({"prompt": ["a", [1, 2]]}, "'prompt' must be a non-empty string"),  # mixed
    ({"prompt": [[1], []]}, "'prompt' must be a non-empty string"),
    ({"prompt": [True, False]}, "'prompt' must be a non-empty string, an array of token ids"),
    ({"prompt": [155, 6099.0, 3381]}, r"an array of token ids \(integers\)"),  # found by tests/test_fuzz_http.py
    ({"prompt": "x", "n": 65}, "'n' must be between 1 and 64"),
    ({"prompt": ["x", "y"], "n": 2}, "'n' and 'best_of' above 1 take one prompt"),
    ({"prompt": "x", "echo": "yes"}, "'echo' must be a boolean"),
    ({"prompt": "x", "echo": False, "max_tokens": 0}, "'max_tokens' must be >= 1"),  # 0 only with echo
    ({"prompt": "x", "n": 3, "best_of": 2}, r"'best_of' must be between n \(3\) and 64"),
    ({"prompt": "x", "best_of": 65}, "'best_of' must be between"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "'best_of' above 'n' cannot be streamed"),
    ({"prompt": ["x", "y"], "best_of": 2}, "'n' and 'best_of' above 1 take one prompt"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature' must be an integer or a number, got str"),
    ({"prompt": "x", "max_tokens": True}, "'max_tokens' must be an integer, got a boolean"),
    ({"prompt": "x", "max_tokens": 1.5}, "'max_tokens' must be an integer, got float"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"prompt": "x", "max_completion_tokens": -1}, "'max_tokens' must be >= 1"),
    ({"prompt": "x", "stop": 3}, "'stop' must be a non-empty string or an array of them"),
    ({"prompt": "x", "stop": ["ok", ""]}, "'stop' must be"),
    ({"prompt": "x", "stop": ""}, "'stop' must be"),
    ({"prompt": "x", "stop_token_ids": [1, "2"]}, "'stop_token_ids' must be an array of integers"),
    ({"prompt": "x", "seed": -1}, "'seed' must be >= 0"),
    ({"prompt": "x", "logprobs": 21}, "'logprobs' must be between 0 and 20"),
    ({"prompt": "x", "logprobs": True}, "'logprobs' must be an integer, got a boolean"),
    ({"prompt": "x", "stream": "yes"}, "'stream' must be a boolean"),
    ({"prompt": "x", "stream_options": []}, "'stream_options' must be an object"),
    ({"prompt": "x", "model": 3}, "'model' must be a string"),
])
def test_bad_completion_bodies_are_refused(body: dict[str, Any], needle: str) -> None:
    """Anything we cannot honour exactly raises BadRequest (a ValueError) saying what is wrong."""
    with pytest.raises(BadRequest, match=needle) as caught:
        parse_completion(body)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("body", "needle"), [
    ({}, "'messages' must be a non-empty array"),
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": {"role": "user", "content": "x"}}, "'messages' must be a non-empty array"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object with a string 'role'"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] must be an object with a string 'role'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]},
     r"messages\[1\]\.content must be a string or an array of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     r"messages\[0\]\.content must be a string or an array of text parts"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]\.content"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "'logprobs' must be a boolean"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "'top_logprobs' must be between 0 and 20"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "'n' must be between 1 and 64"),
])
def test_bad_chat_bodies_are_refused(body: dict[str, Any], needle: str) -> None:
    """Bad messages or chat-specific fields raise BadRequest saying what is wrong."""
    with pytest.raises(BadRequest, match=needle):
        parse_chat(body)


@pytest.mark.parametrize("body", [{"prompt": "x", "max_tokens": 2**40}, {"prompt": [2**40]},
                                  {"prompt": "x", "seed": 2**70}])
def test_out_of_range_integers_are_bad_requests(body: dict[str, Any]) -> None:
    """Integers too large for their field are refused as BadRequest."""
    with pytest.raises(BadRequest):
        parse_completion(body)


# found by tests/test_fuzz_http.py: each of these was a 500 or was accepted
@pytest.mark.parametrize(("body", "needle"), [
    ({"prompt": "x", "timeout": 10**400}, "'timeout' must be a finite number"),  # OverflowError: a 500
    ({"prompt": "x", "temperature": 10**400}, "'temperature' must be a finite number"),
    ({"prompt": "x", "temperature": 1e39}, "'temperature' is out of range"),  # a float32 holds no more
    ({"prompt": "x", "timeout": float("nan")}, "'timeout' must be a finite number"),
    ({"prompt": "x", "seed": 2**64}, r"'seed' is out of range \(0 to 18446744073709551615\)"),
    ({"prompt": "x", "top_k": 2**31}, r"'top_k' is out of range \(-2147483648 to 2147483647\)"),
    ({"prompt": "x", "priority": -(2**31) - 1}, "'priority' is out of range"),
    ({"prompt": "x", "max_tokens": 2**32}, "'max_tokens' is out of range"),
    ({"prompt": [2**31]}, "'prompt' holds a token id outside the int32 range"),
    ({"prompt": "x", "stop_token_ids": [2**31]}, "'stop_token_ids' holds an id outside the int32 range"),
    ({"prompt": "x", "top_p": 1.00000001}, "top_p must be in"),  # float32 rounded it to 1.0: accepted
    ({"prompt": "x", "presence_penalty": -2.0000001}, "presence_penalty must be in"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "'include_usage' must be a boolean"),
])
def test_values_out_of_range_are_refused_by_name(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        parse_completion(body)


def test_top_logprobs_is_checked_without_logprobs() -> None:
    """The schema bounds top_logprobs whatever logprobs says (found by tests/test_openapi_schema.py)."""
    with pytest.raises(BadRequest, match="'top_logprobs' must be between 0 and 20"):
        chat(top_logprobs=21)


@pytest.mark.parametrize(("raw", "needle"), [
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    (b'{"prompt": "x", "temperature": -Infinity}', "-Infinity is not a JSON value"),
    (b'{"prompt": "x", "temperature": 1e999}', "the number 1e999 is out of range"),
    (b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", "a number has too many digits"),  # a ValueError: a 500
    (b"[" * 100_000 + b"]" * 100_000, "it nests too deeply"),  # a RecursionError: a 500
    (b'{"prompt": "\xff"}', "not UTF-8"),
    (b"{", "not valid JSON"),
])
def test_bodies_that_are_not_strict_json_are_refused(raw: bytes, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        decode_json(raw)


def test_strict_json_decodes() -> None:
    assert decode_json(rb'{"a": [1, 2.5, "\u00e9", null, true]}') == {"a": [1, 2.5, "é", None, True]}


# -- responses -------------------------------------------------------------------------------------
def token_text(token_id: int) -> str:
    return f"<{token_id}>"


def chunks(request_id: str = "r1") -> list[pb.GenerateResponse]:
    return [
        pb.GenerateResponse(request_id=request_id, token_ids=[1], text="Hel"),
        pb.GenerateResponse(request_id=request_id, token_ids=[2, 3], text="lo w"),
        pb.GenerateResponse(request_id=request_id, token_ids=[4], text="orld", finish_reason=pb.FINISH_REASON_LENGTH,
                            usage=pb.Usage(prompt_tokens=5, completion_tokens=4, cached_prompt_tokens=2)),
    ]


EXPECTED_USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                  "prompt_tokens_details": {"cached_tokens": 2}}


def test_completion_final_object() -> None:
    """A whole completion: text joined, finish reason, usage totals, object text_completion, id cmpl-<rid>."""
    builder = ResponseBuilder(completion(), "served", token_text)
    for chunk in chunks():
        builder.absorb(chunk)
    body = builder.final()
    assert body["object"] == "text_completion"
    assert body["id"] == "cmpl-r1"
    assert body["model"] == "served"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == EXPECTED_USAGE


def test_chat_final_object() -> None:
    """A whole chat completion: an assistant message, object chat.completion, id chatcmpl-<rid>."""
    builder = ResponseBuilder(chat(), "served", token_text)
    for chunk in chunks():
        builder.absorb(chunk)
    body = builder.final()
    assert body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-r1"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == EXPECTED_USAGE


def test_chat_stream_chunks_and_usage_chunk() -> None:
    """Chat streaming: the first delta carries role assistant, later ones content only; the last has the
    finish reason; the usage chunk has no choices and the totals."""
    builder = ResponseBuilder(chat(stream=True, stream_options={"include_usage": True}), "served", token_text)
    streamed = [builder.stream_chunk(c, first=i == 0) for i, c in enumerate(chunks())]
    assert {b["object"] for b in streamed} == {"chat.completion.chunk"}
    assert {b["id"] for b in streamed} == {"chatcmpl-r1"}
    deltas = [b["choices"][0]["delta"] for b in streamed]
    assert deltas == [{"role": "assistant", "content": "Hel"}, {"content": "lo w"}, {"content": "orld"}]
    assert [b["choices"][0]["finish_reason"] for b in streamed] == [None, None, "length"]
    usage = builder.usage_chunk()
    assert usage["object"] == "chat.completion.chunk"
    assert usage["choices"] == []
    assert usage["usage"] == EXPECTED_USAGE


def test_completion_stream_chunks() -> None:
    """Completion streaming: text_completion chunks with text deltas that add up to the whole text."""
    builder = ResponseBuilder(completion(stream=True), "served", token_text)
    streamed = [builder.stream_chunk(c, first=i == 0) for i, c in enumerate(chunks())]
    assert {b["object"] for b in streamed} == {"text_completion"}
    assert "".join(b["choices"][0]["text"] for b in streamed) == "Hello world"
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"
    assert builder.usage_chunk()["usage"]["total_tokens"] == 9
    assert builder.final()["choices"][0]["text"] == "Hello world"  # stream_chunk also absorbs


@pytest.mark.parametrize(("reason", "name"), [(pb.FINISH_REASON_STOP, "stop"), (pb.FINISH_REASON_ABORT, "abort")])
def test_finish_reasons_are_named(reason: int, name: str) -> None:
    """Proto finish reasons map to OpenAI's names."""
    builder = ResponseBuilder(completion(), "m", token_text)
    builder.absorb(pb.GenerateResponse(request_id="x", text="a", finish_reason=reason))  # type: ignore[arg-type]
    assert builder.final()["choices"][0]["finish_reason"] == name
    assert builder.final()["usage"] is None  # no usage chunk came


def test_logprobs_in_completion_and_chat_shapes() -> None:
    """Asked-for logprobs come out in the completions shape (tokens/token_logprobs/top_logprobs) or the
    chat shape (content entries with token, logprob, bytes, top_logprobs)."""
    lp = pb.TokenLogprob(token_id=7, logprob=-0.5, top=[pb.TopLogprob(token_id=7, logprob=-0.5),
                                                       pb.TopLogprob(token_id=8, logprob=-1.0)])
    chunk = pb.GenerateResponse(request_id="x", token_ids=[7], text="<7>", logprobs=[lp],
                                finish_reason=pb.FINISH_REASON_STOP)
    text = ResponseBuilder(completion(logprobs=2), "m", token_text)
    text.absorb(chunk)
    assert text.final()["choices"][0]["logprobs"] == {
        "tokens": ["<7>"], "token_logprobs": [-0.5], "top_logprobs": [{"<7>": -0.5, "<8>": -1.0}], "text_offset": [0]}
    talk = ResponseBuilder(chat(logprobs=True, top_logprobs=1), "m", token_text)
    streamed = talk.stream_chunk(chunk, first=True)
    content = streamed["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "<7>", "logprob": -0.5, "bytes": list(b"<7>"),
                        "top_logprobs": [{"token": "<7>", "logprob": -0.5, "bytes": list(b"<7>")},
                                         {"token": "<8>", "logprob": -1.0, "bytes": list(b"<8>")}]}]


def test_unknown_fields_are_refused_by_name_and_null_ones_pass() -> None:
    from cluster.openai_protocol import parse_chat, parse_completion
    with pytest.raises(BadRequest, match="'suffix'"):
        parse_completion({"prompt": "x", "suffix": "y"})
    with pytest.raises(BadRequest, match="'metadata', 'store'"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "store": True, "metadata": {"a": "b"}})
    parse_chat({"messages": [{"role": "user", "content": "x"}], "store": None, "functions": None})


def test_several_prompts_are_one_request_each_with_the_same_parameters() -> None:
    parsed = parse_completion({"prompt": ["a", "b"], "max_tokens": 3, "logprobs": 1, "request_id": "r"})
    assert [g.text for g in parsed.generates] == ["a", "b"]
    ids = parse_completion({"prompt": [[5, 6], [7]]})
    assert [list(g.token_ids.ids) for g in ids.generates] == [[5, 6], [7]]
    assert [g.request_id for g in parsed.generates] == ["r-0", "r-1"]
    assert all(g.sampling.max_tokens == 3 and g.sampling.logprobs == 1 for g in parsed.generates)
    assert parse_completion({"prompt": ["a"]}).generates == (parse_completion({"prompt": "a"}).generate,)


def test_n_choices_share_the_prompt_and_derive_their_seeds() -> None:
    seeded = parse_chat({"messages": [{"role": "user", "content": "x"}], "n": 3, "seed": 2**64 - 2, "request_id": "r"})
    assert seeded.shared_prompt and [g.sampling.seed for g in seeded.generates] == [2**64 - 2, 2**64 - 1, 0]
    assert [g.request_id for g in seeded.generates] == ["r-0", "r-1", "r-2"]
    unseeded = parse_completion({"prompt": "x", "n": 2})
    assert [g.sampling.HasField("seed") for g in unseeded.generates] == [False, False]
    assert not parse_completion({"prompt": "x", "n": 1}).several


def test_echo_asks_for_prompt_logprobs_and_max_tokens_0_for_the_prompt_alone() -> None:
    scored = parse_completion({"prompt": "x", "echo": True, "logprobs": 2, "max_tokens": 0})
    assert scored.echo and scored.prompt_only
    assert scored.generate.sampling.prompt_logprobs == 2 and scored.generate.sampling.max_tokens == 1
    plain = parse_completion({"prompt": "x", "echo": True, "max_completion_tokens": 5})
    assert plain.echo and not plain.prompt_only and not plain.generate.sampling.HasField("prompt_logprobs")
    assert not parse_completion({"prompt": "x", "logprobs": 2}).generate.sampling.HasField("prompt_logprobs")


@pytest.mark.parametrize("parse_body", [(parse_completion, {"prompt": "x"}),
                                        (parse_chat, {"messages": [{"role": "user", "content": "x"}]})])
def test_best_of_runs_that_many_choices_with_logprobs_to_rank_them(parse_body: Any) -> None:
    parse, body = parse_body
    ranked = parse({**body, "n": 2, "best_of": 5, "seed": 7})
    assert (ranked.n, ranked.best_of, len(ranked.generates)) == (2, 5, 5)
    assert [g.sampling.seed for g in ranked.generates] == [7, 8, 9, 10, 11]
    assert all(g.sampling.logprobs == 0 for g in ranked.generates)  # computed to rank, not returned
    assert ranked.logprobs is None
    same = parse({**body, "n": 3, "best_of": 3})
    assert same.best_of == same.n == 3 and not same.generates[0].sampling.HasField("logprobs")


@pytest.mark.parametrize("preset_id", [False, True])  # several choices share an id set before any chunk
def test_echo_puts_the_prompt_and_its_logprobs_first(preset_id: bool) -> None:
    request = parse_completion({"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0})
    builder = ResponseBuilder(request, "served", token_text, PromptEcho("Go!", 7))
    if preset_id:
        builder.id = "cmpl-shared"
    scored = [pb.TokenLogprob(token_id=8, logprob=-1.5, top=[pb.TopLogprob(token_id=8, logprob=-1.5)])]
    builder.absorb(pb.GenerateResponse(request_id="r1", token_ids=[2], text="Hi", prompt_logprobs=scored,
                                       logprobs=[pb.TokenLogprob(token_id=2, logprob=-0.1)],
                                       finish_reason=pb.FINISH_REASON_STOP,
                                       usage=pb.Usage(prompt_tokens=2, completion_tokens=1)))
    choice = builder.final()["choices"][0]
    assert choice["text"] == "Go!" and choice["finish_reason"] == "length"  # max_tokens 0: the token is dropped
    lp = choice["logprobs"]
    assert lp["tokens"] == [token_text(7), token_text(8)] and lp["token_logprobs"] == [None, -1.5]
    assert lp["top_logprobs"] == [None, {token_text(8): -1.5}]
    assert lp["text_offset"] == [0, len(token_text(7))]
    assert builder.final()["usage"]["completion_tokens"] == 0
