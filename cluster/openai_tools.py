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
from typing import Any

from cluster.openai_fields import BadRequest, refuse_unknown
from common.json_text import JsonTextError, load_json_object
from engine.chat_tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from tandem.v1 import inference_pb2 as pb

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolUse:
    """How a request's output is read: `mode` auto, required or named (`function` set)."""

    mode: str
    names: frozenset[str]
    function: str = ""


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
    if mode != "auto":
        if request.sampling.HasField("structured"):
            raise BadRequest("'tool_choice' required or a named function constrains the output: "
                             "it cannot be combined with structured output")
        call_schemas = [_call_schema(name, schemas[name]) for name in ([function] if function else schemas)]
        schema: dict[str, Any] = call_schemas[0] if function else {
            "type": "array", "minItems": 1, "items": {"anyOf": call_schemas}}
        if not function and parallel is False:
            schema["maxItems"] = 1
        request.sampling.structured.CopyFrom(pb.StructuredOutput(json_schema=json.dumps(schema)))
    return ToolUse(mode, frozenset(schemas), function)


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


def _choice(choice: Any, schemas: dict[str, dict[str, Any]]) -> tuple[str, str]:
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto", ""
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
    for match in _BLOCK.finditer(text):
        try:
            value = json.loads(match.group(1))
        except (ValueError, RecursionError):
            continue
        if not isinstance(value, dict) or value.get("name") not in use.names \
                or not isinstance(value.get("arguments"), dict):
            continue
        content.append(text[last:match.start()])
        last = match.end()
        calls.append(_call(value["name"], value["arguments"]))
    content.append(text[last:])
    return "".join(content) if calls else text, calls


class ToolCallStream:
    """Streams the content that cannot belong to a tool call; the calls come at the end. In auto
    mode text is held back from the first `<tool_call>` on (or from a suffix that could begin one)."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""
        self.sent = 0  # chars of `text` already streamed as content

    def feed(self, text: str) -> str:
        self.text += text
        if self.use.mode != "auto":
            return ""
        start = self.text.find(TOOL_CALL_OPEN, self.sent)
        if start < 0:
            start = len(self.text)
            for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text) - self.sent), 0, -1):
                if TOOL_CALL_OPEN.startswith(self.text[-k:]):
                    start = len(self.text) - k
                    break
        out, self.sent = self.text[self.sent:start], max(self.sent, start)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(the content not streamed yet, the tool calls)."""
        content, calls = parse_output(self.use, self.text)
        # held back from the first possible call on, so the streamed text is a prefix of the content
        return content[self.sent:], calls
