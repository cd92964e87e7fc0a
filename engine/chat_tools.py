"""Tools in a chat, for chat templates that know none (SmolLM2's, for one): the conversation
rewritten into plain turns in the Hermes format that Qwen's and SmolLM's tool prompts use.

- the tool definitions join the system message, inside `<tools></tools>`, one JSON object per line,
  with the instruction to answer a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- an assistant turn's `tool_calls` become those `<tool_call>` blocks after its content;
- a `tool` turn (a call's result) becomes a user turn holding `<tool_response>...</tool_response>`.

cluster/openai_tools.py parses the model's `<tool_call>` blocks back into OpenAI tool calls.
Messages are in transformers' form: {"role", "content", "tool_calls": [{"id", "type": "function",
"function": {"name", "arguments": dict}}], "tool_call_id"}; tools {"type": "function",
"function": {"name", "description", "parameters"}}.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_INSTRUCTIONS = (
    "# Tools\n\nYou can call functions to help answer. Their signatures are inside <tools></tools>:\n<tools>\n{tools}\n"
    "</tools>\n\nTo call one, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n<tool_call>\n"
    '{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>')


def uses_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def as_hermes_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The conversation as {"role", "content"} turns any chat template renders."""
    turns: list[dict[str, str]] = []
    if tools:
        listing = _INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            turns.append({"role": "system", "content": f"{messages[0]['content']}\n\n{listing}"})
            messages = messages[1:]
        else:
            turns.append({"role": "system", "content": listing})
    for message in messages:
        if message["role"] == "tool":
            turns.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
            continue
        content = message.get("content") or ""
        calls = [f"{TOOL_CALL_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                     "arguments": c["function"]["arguments"]},
                                                    ensure_ascii=False) + f"\n{TOOL_CALL_CLOSE}"
                 for c in message.get("tool_calls") or ()]
        turns.append({"role": message["role"], "content": "\n".join([content, *calls] if content else calls)})
    return turns
