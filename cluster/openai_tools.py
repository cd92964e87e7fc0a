"""OpenAI tool calling on chat completions: `tools`, `tool_choice`, `parallel_tool_calls` read into
the request, and the model's output parsed back into `tool_calls`.

- `auto`: the tools are rendered into the prompt (engine.chat_tools for templates without tool
  support); the model may answer with Hermes-format `<tool_call>{"name", "arguments"}</tool_call>`
  blocks (SmolLM2's and Qwen's format; Llama 3's bare JSON is not parsed), which become tool calls;
  text outside them is the content. A block that does not parse, or names no tool, stays content.
- `required`: the output is constrained (structured output) to a JSON array of one or more calls
  (exactly one without `parallel_tool_calls`), each {"name": a tool's, "arguments": an instance of
  that tool's parameters schema}; a named function: one such object for that tool. The arguments
  therefore always parse and match the schema.
- `none`: the tools are not rendered and nothing is parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from cluster.openai_fields import BadRequest, refuse_unknown
from common.json_text import JsonTextError, load_json_object
from engine.chat_tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from tandem.v1 import inference_pb2 as pb

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DECODER = json.JSONDecoder()
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolUse:
    """How a request's output is read: `mode` auto, required or named (`function` set)."""

    mode: Literal["auto", "required", "named"]
    names: frozenset[str]
    function: str = ""
    parallel: bool = True  # false: at most one call


def read_tools(body: dict[str, Any], request: pb.GenerateRequest) -> ToolUse | None:
    """Fills request.chat.tools (and, for required or named, request.sampling.structured)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("'parallel_tool_calls' must be a boolean")
    if tools is None:
        if choice not in (None, "none"):
            raise BadRequest("'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list) or not tools:
        raise BadRequest("'tools' must be a non-empty array of {'type': 'function', 'function': {...}}")
    schemas: dict[str, dict[str, Any]] = {}
    definitions = [_definition(tool, i, schemas) for i, tool in enumerate(tools)]
    mode, function = _choice(choice, schemas)
    if mode == "none":
        return None
    request.chat.tools.extend(definitions)
    return _use(request, schemas, mode, function, parallel is not False)


def read_grpc_tools(request: pb.GenerateRequest) -> ToolUse | None:
    """The gRPC form: ChatInput's tools, tool_choice and parallel_tool_calls, checked as the HTTP
    ones are (BadRequest); `none` takes the tools out of the request, `required` and a named
    function set its structured output."""
    if request.WhichOneof("input") != "chat":
        return None
    chat = request.chat
    kind = chat.tool_choice.WhichOneof("choice") if chat.HasField("tool_choice") else None
    choice: Any = None if kind is None else chat.tool_choice.mode if kind == "mode" else {
        "type": "function", "function": {"name": chat.tool_choice.function}}
    if not chat.tools:
        if choice not in (None, "none") or chat.HasField("parallel_tool_calls"):
            raise BadRequest("'tool_choice' and 'parallel_tool_calls' need 'tools'")
        return None
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(chat.tools):
        try:
            parameters = load_json_object(tool.parameters, f"tools[{i}].parameters") if tool.parameters else None
        except JsonTextError as e:
            raise BadRequest(str(e)) from e
        _definition({"type": "function", "function": {"name": tool.name, "parameters": parameters}}, i, schemas)
    mode, function = _choice(choice, schemas)
    if mode == "none":
        chat.ClearField("tools")
        return None
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
    return _use(request, schemas, mode, function, parallel)


def _use(request: pb.GenerateRequest, schemas: dict[str, dict[str, Any]], mode: Literal["auto", "required", "named"],
         function: str, parallel: bool) -> ToolUse:
    """How the output is read; `required` and a named function constrain it (structured output)."""
    if mode != "auto":
        if request.sampling.HasField("structured"):
            raise BadRequest("'tool_choice' required or a named function constrains the output: "
                             "it cannot be combined with structured output")
        request.sampling.structured.CopyFrom(pb.StructuredOutput(json_schema=json.dumps(
            _forcing_schema([function] if function else list(schemas), schemas, single=bool(function),
                            parallel=parallel))))
    return ToolUse(mode, frozenset(schemas), function, parallel)


def _forcing_schema(names: list[str], schemas: dict[str, dict[str, Any]], single: bool,
                    parallel: bool) -> dict[str, Any]:
    """The calls' schema. Each tool's `$defs` / `definitions` move to the root, where its `#/$defs/..`
    references (Pydantic's nested models) still find them; two tools defining one name differently
    are refused."""
    lifted: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    calls = []
    for name in names:
        parameters = dict(schemas[name])
        for key, found in lifted.items():
            definitions = parameters.pop(key, None) or {}
            if not isinstance(definitions, dict):
                raise BadRequest(f"tool {name!r}: '{key}' must be an object of schemas")
            for def_name, definition in definitions.items():
                if found.setdefault(def_name, definition) != definition:
                    raise BadRequest(f"tools define '{key}/{def_name}' differently: rename one")
        calls.append(_call_schema(name, parameters))
    schema: dict[str, Any] = calls[0] if single else {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not single and not parallel:
        schema["maxItems"] = 1
    schema.update({key: found for key, found in lifted.items() if found})
    return schema


def _definition(tool: Any, index: int, schemas: dict[str, dict[str, Any]]) -> pb.ToolDefinition:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise BadRequest(f"'{where}' must be {{'type': 'function', 'function': {{'name': ...}}}}")
    refuse_unknown(tool, ("type", "function"), f"{where}.")
    function = tool["function"]
    refuse_unknown(function, ("name", "description", "parameters", "strict"), f"{where}.function.")
    name, description = function.get("name"), function.get("description")
    parameters, strict = function.get("parameters"), function.get("strict")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-'")
    if name in schemas:
        raise BadRequest(f"'{where}.function.name' repeats the tool name {name!r}")
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"'{where}.function.description' must be a string")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadRequest(f"'{where}.function.parameters' must be a JSON Schema object")
    if strict is not None and not isinstance(strict, bool):  # the schema is enforced when a call is forced
        raise BadRequest(f"'{where}.function.strict' must be a boolean")
    schemas[name] = parameters or _NO_PARAMETERS
    return pb.ToolDefinition(name=name, description=description or "", parameters=json.dumps(schemas[name]))


def _choice(choice: Any, schemas: dict[str, dict[str, Any]]) -> tuple[Literal["auto", "none", "required", "named"],
                                                                      str]:
    if choice is None or choice == "auto":
        return "auto", ""
    if choice in ("none", "required"):
        return choice, ""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        refuse_unknown(choice, ("type", "function"), "tool_choice.")
        refuse_unknown(choice["function"], ("name",), "tool_choice.function.")
        name = choice["function"].get("name")
        if name not in schemas:
            raise BadRequest(f"'tool_choice.function.name' {name!r} is not one of the tools")
        return "named", name
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                     "'function': {'name': ...}}")


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name}, "arguments": parameters}}


def read_tool_calls(message: dict[str, Any], index: int) -> list[pb.ToolCall]:
    """An assistant message's `tool_calls`, checked."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    where = f"messages[{index}].tool_calls"
    if message.get("role") != "assistant" or not isinstance(calls, list):
        raise BadRequest(f"'{where}' must be an array, on an assistant message")
    result = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise BadRequest(f"'{where}[{j}]' must be {{'id', 'type': 'function', "
                             "'function': {'name', 'arguments'}}")
        refuse_unknown(call, ("id", "type", "function"), f"{where}[{j}].")
        refuse_unknown(function, ("name", "arguments"), f"{where}[{j}].function.")
        call_id, name, arguments = call.get("id", ""), function.get("name"), function.get("arguments")
        if not isinstance(call_id, str) or not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise BadRequest(f"'{where}[{j}]' needs a string id, function.name and function.arguments")
        try:
            load_json_object(arguments, f"{where}[{j}].function.arguments")
        except JsonTextError as e:
            raise BadRequest(str(e)) from e
        result.append(pb.ToolCall(id=call_id, name=name, arguments=arguments))
    return result


# -- the output ----------------------------------------------------------------------------------------
def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_output(use: ToolUse, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool calls) of a finished output; the content is the text outside the calls."""
    if use.mode != "auto":
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # cut by max_tokens or a stop string: no call to report
            return text, []
        items = [value] if use.function else value
        if not isinstance(items, list) or not all(isinstance(v, dict) and "arguments" in v for v in items):
            return text, []
        return "", [_call(v.get("name", use.function), v["arguments"]) for v in items]
    calls: list[dict[str, Any]] = []
    content: list[str] = []
    last = 0
    start = text.find(TOOL_CALL_OPEN)
    while start >= 0:
        found = _hermes_call(text, start + len(TOOL_CALL_OPEN), use.names)
        if found is None:
            start = text.find(TOOL_CALL_OPEN, start + 1)
            continue
        (name, arguments), end = found
        content.append(text[last:start])
        calls.append(_call(name, arguments))
        last = end
        start = text.find(TOOL_CALL_OPEN, end)
    content.append(text[last:])
    if not use.parallel:
        calls = calls[:1]
    return "".join(content) if calls else text, calls


def _hermes_call(text: str, at: int, names: frozenset[str]) -> tuple[tuple[str, dict[str, Any]], int] | None:
    """The call whose JSON starts after `at` (whitespace skipped) and where its block ends: after
    `</tool_call>`, or at the end of the text (a block cut by eos or a stop string), or None.
    The JSON is decoded first, so a `</tool_call>` inside an argument string does not end it."""
    at += len(text[at:]) - len(text[at:].lstrip())
    try:
        value, end = _DECODER.raw_decode(text, at)
    except (ValueError, RecursionError):
        return None
    arguments = value.get("arguments") if isinstance(value, dict) else None
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    rest = text[end:].lstrip()
    if rest.startswith(TOOL_CALL_CLOSE):
        end = len(text) - len(rest) + len(TOOL_CALL_CLOSE)
    elif rest:
        return None
    return (value["name"], arguments), end


class ToolCallStream:
    """Streams the content that cannot belong to a tool call. In auto mode text is held back from
    the first `<tool_call>` on (or from a suffix that could begin one), and each block is a call as
    soon as its `</tool_call>` arrives (`new_calls`); forced calls (one JSON value) come at the end.

    Invariant: `calls` (handed out or not) are the first calls `parse_output` finds in the finished
    text: a block is read early only when it parses and is closed, and reading stops at the first
    block that does not parse yet (parse_output would skip it, or read it later)."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""
        self.sent = 0  # chars of `text` already streamed as content
        self.calls: list[dict[str, Any]] = []
        self.handed_out = 0  # calls returned by new_calls
        self._read_to = 0  # text before this is read for calls
        self._blocked = False  # a block that does not parse (yet): no more early calls

    def feed(self, text: str) -> str:
        self.text += text
        if self.use.mode != "auto":
            return ""
        self._read_closed_blocks()
        start = self.text.find(TOOL_CALL_OPEN, self.sent)
        if start < 0:
            start = len(self.text)
            for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text) - self.sent), 0, -1):
                if TOOL_CALL_OPEN.startswith(self.text[-k:]):
                    start = len(self.text) - k
                    break
        out, self.sent = self.text[self.sent:start], max(self.sent, start)
        return out

    def _read_closed_blocks(self) -> None:
        while not self._blocked and (self.use.parallel or not self.calls):
            start = self.text.find(TOOL_CALL_OPEN, self._read_to)
            if start < 0:
                return
            found = _hermes_call(self.text, start + len(TOOL_CALL_OPEN), self.use.names)
            if found is None or not self.text[:found[1]].endswith(TOOL_CALL_CLOSE):
                self._blocked = found is None and TOOL_CALL_CLOSE in self.text[start:]
                return
            (name, arguments), self._read_to = found
            self.calls.append(_call(name, arguments))

    def new_calls(self) -> list[tuple[int, dict[str, Any]]]:
        """Calls read since the last call of this, with their indices."""
        fresh = list(enumerate(self.calls))[self.handed_out:]
        self.handed_out = len(self.calls)
        return fresh

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(the content not streamed yet, every tool call); calls read early keep their ids."""
        content, calls = parse_output(self.use, self.text)
        self.calls = self.calls + calls[len(self.calls):]
        # held back from the first possible call on, so the streamed text is a prefix of the content;
        # with calls, what is left is stripped as the whole reply's content is
        rest = content[self.sent:]
        return (rest.rstrip() if calls else rest), list(self.calls)
