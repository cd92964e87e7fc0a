"""Tool calling without a cluster: requests read into the chat input and the forcing schema, the
Hermes rendering for templates without tools (and pass-through for templates with them), and the
model's output parsed into tool calls, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from cluster.openai_fields import BadRequest
from cluster.openai_protocol import ResponseBuilder, parse_chat
from engine.grammar import check_structured
from engine.structured_output import StructuredOutput
from engine.tokenizer import Tokenizer
from tandem.v1 import inference_pb2 as pb
from worker_runtime.convert import chat_from_proto

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def builder(**body: Any) -> ResponseBuilder:
    return ResponseBuilder(parse_chat({"messages": ASK, **body}), "m", str)


def final(text: str, **body: Any) -> dict[str, Any]:
    b = builder(**body)
    b.absorb(pb.GenerateResponse(request_id="r", text=text, finish_reason=pb.FINISH_REASON_STOP))
    return dict(b.final()["choices"][0])


def streamed(pieces: list[str], **body: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    content, calls, reason, _ = streamed_by_chunk(pieces, **body)
    return content, calls, reason


def streamed_by_chunk(pieces: list[str], **body: Any) -> tuple[str, list[dict[str, Any]], str | None, list[int]]:
    """(content, calls, finish reason, the chunk each call came in)."""
    b = builder(stream=True, **body)
    content, calls, reason, arrived = "", [], None, []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        choice = b.stream_chunk(pb.GenerateResponse(request_id="r", text=piece, finish_reason=(
            pb.FINISH_REASON_STOP if last else pb.FINISH_REASON_UNSPECIFIED)), first=i == 0)["choices"][0]
        assert "<tool" not in choice["delta"]["content"], "a tool call's text leaked into the streamed content"
        content += choice["delta"]["content"]
        fresh = choice["delta"].get("tool_calls", [])
        calls += fresh
        arrived += [i] * len(fresh)
        reason = choice["finish_reason"]
    return content, calls, reason, arrived


def test_required_and_named_choices_force_a_schema() -> None:
    required = parse_chat({"messages": ASK, "tools": [WEATHER, CLOCK], "tool_choice": "required"})
    schema = json.loads(required.generate.sampling.structured.json_schema)
    jsonschema.validate([{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "clock", "arguments": {}}],
                        schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "weather", "arguments": {}}], schema)  # city is required
    single = parse_chat({"messages": ASK, "tools": [WEATHER, CLOCK], "tool_choice": "required",
                         "parallel_tool_calls": False})
    assert json.loads(single.generate.sampling.structured.json_schema)["maxItems"] == 1
    named = parse_chat({"messages": ASK, "tools": [WEATHER, CLOCK],
                        "tool_choice": {"type": "function", "function": {"name": "clock"}}})
    schema = json.loads(named.generate.sampling.structured.json_schema)
    jsonschema.validate({"name": "clock", "arguments": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "weather", "arguments": {"city": "x"}}, schema)
    auto = parse_chat({"messages": ASK, "tools": [WEATHER]})
    assert not auto.generate.sampling.HasField("structured") and len(auto.generate.chat.tools) == 1
    none = parse_chat({"messages": ASK, "tools": [WEATHER], "tool_choice": "none"})
    assert none.tools is None and not none.generate.chat.tools


def test_nested_models_keep_their_definitions() -> None:
    """Pydantic's nested models refer to `#/$defs/...`: the definitions move to the forcing
    schema's root, where the references still resolve."""
    inner = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    address = {"$defs": {"Address": inner}, "type": "object", "required": ["home"],
               "properties": {"home": {"$ref": "#/$defs/Address"}}}
    tool = {"type": "function", "function": {"name": "move", "parameters": address}}
    for choice in ("required", {"type": "function", "function": {"name": "move"}}):
        parsed = parse_chat({"messages": ASK, "tools": [tool, WEATHER], "tool_choice": choice})
        schema = json.loads(parsed.generate.sampling.structured.json_schema)
        call = {"name": "move", "arguments": {"home": {"city": "Oslo"}}}
        jsonschema.validate([call] if choice == "required" else call, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "move", "arguments": {"home": {}}}] if choice == "required" else
                                {"name": "move", "arguments": {"home": {}}}, schema)
        check_structured(StructuredOutput("json_schema", json.dumps(schema)))  # xgrammar resolves it too
    other = {"type": "function", "function": {"name": "stay", "parameters": {
        **address, "$defs": {"Address": {"type": "string"}}}}}
    with pytest.raises(BadRequest, match="differently"):
        parse_chat({"messages": ASK, "tools": [tool, other], "tool_choice": "required"})


def test_forced_calls_are_parsed() -> None:
    choice = final('[{"name": "weather", "arguments": {"city": "Paris"}}]', tools=[WEATHER], tool_choice="required")
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'} and call["type"] == "function"
    named = final('{"name": "clock", "arguments": {}}', tools=[WEATHER, CLOCK],
                  tool_choice={"type": "function", "function": {"name": "clock"}})
    assert named["message"]["tool_calls"][0]["function"]["name"] == "clock"
    assert named["finish_reason"] == "stop"  # as OpenAI and vLLM say for a named function
    cut = final('[{"name": "weather", "argu', tools=[WEATHER], tool_choice="required")  # max_tokens cut it
    assert "tool_calls" not in cut["message"] and cut["message"]["content"] == '[{"name": "weather", "argu'


def test_auto_calls_are_parsed_from_hermes_blocks() -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    choice = final(text, tools=[WEATHER])
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
    cities = [json.loads(c["function"]["arguments"])["city"] for c in choice["message"]["tool_calls"]]
    assert cities == ["Paris", "Rome"]
    tricky = final('<tool_call>{"name": "weather", "arguments": {"city": "</tool_call>"}}</tool_call> then '
                   '<tool_call>\n{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', tools=[WEATHER])
    assert [json.loads(c["function"]["arguments"])["city"] for c in tricky["message"]["tool_calls"]] == \
        ["</tool_call>", "Oslo"]  # a closing tag inside a string; arguments as a JSON string; an unclosed block
    assert tricky["message"]["content"] == "then"
    single = final(text, tools=[WEATHER], parallel_tool_calls=False)
    assert len(single["message"]["tool_calls"]) == 1
    for bad in ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # not one of the tools
                '<tool_call>{"name": ["weather"], "arguments": {}}</tool_call>',  # not a name
                '<tool_call>{"name": "weather", "arguments": </tool_call>',  # not JSON
                "It is sunny."):
        plain = final(bad, tools=[WEATHER])
        assert plain["message"] == {"role": "assistant", "content": bad} and plain["finish_reason"] == "stop"


def test_streaming_holds_back_only_what_may_be_a_call() -> None:
    content, calls, reason = streamed(["Let me ", "look.<to", "ol_call>\n{\"name\": \"weather\", ",
                                       "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"], tools=[WEATHER])
    assert content == "Let me look." and reason == "tool_calls"
    assert calls[0]["index"] == 0 and calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    content, calls, reason = streamed(["a <b> ", "<to", "day"], tools=[WEATHER])  # a false start is released
    assert (content, calls, reason) == ("a <b> <today", [], "stop")
    content, calls, reason = streamed(['[{"name": "weather", ', '"arguments": {"city": "X"}}]'],
                                      tools=[WEATHER], tool_choice="required")
    assert content == "" and len(calls) == 1 and reason == "tool_calls"


def test_each_call_streams_once_its_block_closes() -> None:
    block = '<tool_call>{{"name": "weather", "arguments": {{"city": "{}"}}}}</tool_call>'
    pieces = ["Checking. ", block.format("Oslo")[:30], block.format("Oslo")[30:], " and ", block.format("Rome"),
              " done", '<tool_call>{"name": "weather", "arg', 'uments": {"city": "Lima"}}']  # the last one unclosed
    content, calls, reason, arrived = streamed_by_chunk(pieces, tools=[WEATHER])
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Oslo", "Rome", "Lima"]
    assert arrived == [2, 4, 7] and [c["index"] for c in calls] == [0, 1, 2] and len({c["id"] for c in calls}) == 3
    assert reason == "tool_calls"
    _, single, _, arrived = streamed_by_chunk(pieces, tools=[WEATHER], parallel_tool_calls=False)
    assert len(single) == 1 and arrived == [2]
    whole = final("".join(pieces), tools=[WEATHER])["message"]  # the same reply, not streamed
    assert content == whole["content"] == "Checking.  and  done"
    assert [c["function"]["arguments"] for c in whole["tool_calls"]] == [c["function"]["arguments"] for c in calls]


@pytest.mark.parametrize(("body", "words"), [
    ({"tool_choice": "auto"}, "needs 'tools'"),
    ({"tools": []}, "non-empty"),
    ({"tools": [WEATHER, WEATHER]}, "repeats"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": []}}]}, "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"$defs": [1]}}}],
      "tool_choice": "required"}, "must be an object of schemas"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "not one of"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "'tool_choice'"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "assistant", "content": None}]}, "content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]}, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "assistant"),
])
def test_bad_tool_requests_are_refused(body: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequest, match=words.replace("[", r"\[")):
        parse_chat({"messages": ASK, **body})


def test_templates_without_tools_get_hermes_turns(default_model_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer.from_source(default_model_path)
    request = parse_chat({"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"}]}).generate
    messages, tools = chat_from_proto(request.chat)
    text = tokenizer.decode(tokenizer.apply_chat_template(messages, tools=tools), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '{"type": "function", "function": {"name": "weather"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call>") in text
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_templates_with_tools_render_them_themselves(default_model_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer.from_source(default_model_path)
    hf = tokenizer.hf_tokenizer
    original = hf.chat_template
    hf.chat_template = ("{% for t in tools or [] %}TOOL:{{ t.function.name }};{% endfor %}"
                        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                        "{% for c in m.tool_calls or [] %}CALL:{{ c.function.name }}{% endfor %};{% endfor %}")
    try:
        ids = tokenizer.apply_chat_template([*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "weather", "arguments": {}}}]}],
            add_generation_prompt=False, tools=[WEATHER])
    finally:
        hf.chat_template = original
    assert tokenizer.decode(ids, skip_special_tokens=False) == \
        "TOOL:weather;user:Weather in Paris?;assistant:CALL:weather;"
