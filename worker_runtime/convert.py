"""Between the wire (tandem.v1 protos) and the engine's dataclasses. Building SamplingParams
validates them (InvalidRequestError, a ValueError, which servers map to INVALID_ARGUMENT); the
engine's `make_request` validates the rest once."""

from __future__ import annotations

from typing import Any

from common.json_text import JsonTextError, load_json_object
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput
from tandem.v1 import inference_pb2 as pb

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "seed", "logprobs", "prompt_logprobs", "skip_special_tokens")
_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "abort": pb.FINISH_REASON_ABORT}


def sampling_from_proto(msg: pb.SamplingParameters) -> SamplingParams:
    """Fields the client left unset keep the engine's defaults."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    kwargs.update(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                  logit_bias=dict(msg.logit_bias), allowed_token_ids=tuple(msg.allowed_token_ids) or None,
                  structured=structured_from_proto(msg.structured) if msg.HasField("structured") else None)
    return SamplingParams(**kwargs)


def structured_from_proto(msg: pb.StructuredOutput) -> StructuredOutput:
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        raise InvalidRequestError("structured output is set but names no kind (json_schema, json_object, "
                                  "regex, choice or grammar)")
    if kind == "choice":
        return StructuredOutput("choice", choices=tuple(msg.choice.choices))
    return StructuredOutput(kind, "" if kind == "json_object" else getattr(msg, kind))


def chat_from_proto(chat: pb.ChatInput) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools in transformers' form (engine.chat_tools), JSON texts parsed;
    InvalidRequestError for one that does not parse into an object."""
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(chat.messages):
        message: dict[str, Any] = {"role": msg.role, "content": msg.content}
        if msg.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": _json_object(c.arguments, f"messages[{i}].tool_calls[{j}].arguments")}}
                for j, c in enumerate(msg.tool_calls)]
        if msg.tool_call_id:
            message["tool_call_id"] = msg.tool_call_id
        messages.append(message)
    names = [t.name for t in chat.tools]
    if not all(names) or len(set(names)) < len(names):
        raise InvalidRequestError("every tool needs a name, and no two the same")
    tools = [{"type": "function", "function": {
        "name": t.name, "description": t.description,
        "parameters": _json_object(t.parameters, f"tools[{k}].parameters") if t.parameters else
        {"type": "object", "properties": {}}}} for k, t in enumerate(chat.tools)]
    return messages, tools or None


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        return load_json_object(text, name)
    except JsonTextError as e:
        raise InvalidRequestError(str(e)) from e


def response_from_output(out: RequestOutput) -> pb.GenerateResponse:
    """One stream chunk: what `out` added since the previous one; usage and reason at the end."""
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids, text=out.new_text,
                              finish_reason=_FINISH[out.finish_reason])
    if out.logprobs is not None:
        for lp in out.logprobs[len(out.token_ids) - len(out.new_token_ids):]:
            if lp is not None:
                msg.logprobs.append(logprob_to_proto(lp))
    if out.prompt_logprobs is not None and len(out.token_ids) == len(out.new_token_ids):  # the first chunk
        msg.prompt_logprobs.extend(prompt_logprobs_to_proto(out.prompt_logprobs))
    if isinstance(out.stop_reason, str):
        msg.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason
    if out.finished:
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(out.token_ids),
                                    cached_prompt_tokens=out.num_cached_tokens))
    return msg


def logprob_to_proto(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def prompt_logprobs_to_proto(found: list[TokenLogprobs | None]) -> list[pb.TokenLogprob]:
    """A prompt's logprobs without the first token's (None: nothing scores it)."""
    return [logprob_to_proto(lp) for lp in found[1:] if lp is not None]


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))
