"""OpenAI-compatible request bodies → tandem.v1 GenerateRequest, and our chunks → OpenAI response
objects. Any field not listed here is refused with a 400 naming it rather than silently ignored;
`user` alone is accepted without effect (OpenAI uses it for abuse monitoring; cluster/openapi.json
says so)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from cluster.openai_constraints import read_constraints
from cluster.openai_fields import BadRequest, refuse_unknown
from cluster.openai_tools import ToolCallStream, ToolUse, parse_output, read_tool_calls, read_tools
from engine.sampling_params import SamplingParams
from tandem.v1 import inference_pb2 as pb

__all__ = ["BadRequest", "OpenAIRequest", "ResponseBuilder", "parse_chat", "parse_completion", "read_messages"]

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
# OpenAI name → (SamplingParameters field, type); vLLM's extensions included
_SAMPLING_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "temperature": ("temperature", (int, float)), "top_p": ("top_p", (int, float)), "top_k": ("top_k", int),
    "min_p": ("min_p", (int, float)), "min_tokens": ("min_tokens", int), "seed": ("seed", int),
    "presence_penalty": ("presence_penalty", (int, float)), "frequency_penalty": ("frequency_penalty", (int, float)),
    "repetition_penalty": ("repetition_penalty", (int, float)), "skip_special_tokens": ("skip_special_tokens", bool)}


_FLOAT32_MAX = 3.4028234663852886e38  # SamplingParameters' float fields hold no more
_INT_RANGES = {FieldDescriptor.CPPTYPE_INT32: "-2147483648 to 2147483647", FieldDescriptor.CPPTYPE_UINT32:
               "0 to 4294967295", FieldDescriptor.CPPTYPE_UINT64: "0 to 18446744073709551615"}
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 64  # n
# the fields each parser knows (a body with any other is refused, naming it)
_COMMON_FIELDS = ("model", "request_id", "timeout", "priority", *_SAMPLING_FIELDS, "max_tokens",
                  "max_completion_tokens", "stop", "stop_token_ids", "ignore_eos", "n", "best_of", "stream",
                  "stream_options", "logit_bias", "allowed_token_ids", "response_format", "guided_json",
                  "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "user", "cache_salt")
_COMPLETION_FIELDS = (*_COMMON_FIELDS, "prompt", "echo", "logprobs")
_CHAT_FIELDS = (*_COMMON_FIELDS, "messages", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls")
_MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id")


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a double
        return False


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BadRequest(f"'{name}' must be {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be {_kind_name(kind)}, got {type(value).__name__}")
    if float in kinds and not _is_finite(value):
        raise BadRequest(f"'{name}' must be a finite number in a double's range")
    return value


def _set(message: Any, target: str, value: Any, name: str) -> None:
    """protobuf raises ValueError for an integer outside its field's range and stores a float
    outside a float32's as infinity: both are the client's error, named."""
    if isinstance(value, float) and abs(value) > _FLOAT32_MAX:
        raise BadRequest(f"'{name}' is out of range: {value:g}")
    try:
        setattr(message, target, value)
    except ValueError as e:
        kind = message.DESCRIPTOR.fields_by_name[target].cpp_type
        raise BadRequest(f"'{name}' is out of range ({_INT_RANGES.get(kind, 'for its field')})") from e


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
                        "list": "an array", "dict": "an object"}.get(k.__name__, k.__name__) for k in kinds)


def _sampling(body: dict[str, Any], default_max_tokens: int | None) -> pb.SamplingParameters:
    params = pb.SamplingParameters()
    floats: dict[str, Any] = {}
    for name, (target, kind) in _SAMPLING_FIELDS.items():
        value = _field(body, name, kind)
        if value is not None:
            if name == "seed" and value < 0:
                raise BadRequest("'seed' must be >= 0")
            if name in ("top_k", "min_tokens") and value < 0 and not (name == "top_k" and value == -1):
                raise BadRequest(f"'{name}' must be >= 0")
            if name == "top_k" and value == -1:
                continue  # vLLM's "no top-k"
            if isinstance(kind, tuple) and float in kind:
                value = floats[target] = float(value)
            _set(params, target, value, name)
    try:  # the engine's ranges, on the numbers as sent: float32 rounds top_p 1.00000001 into (0, 1]
        SamplingParams(**floats)
    except ValueError as e:
        raise BadRequest(str(e)) from e
    max_tokens = _field(body, "max_completion_tokens", int, _field(body, "max_tokens", int, default_max_tokens))
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest("'max_tokens' must be >= 1")
        _set(params, "max_tokens", max_tokens, "max_tokens")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("'stop' must be a non-empty string or an array of them")
        params.stop.extend(stops)
    stop_ids = _field(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise BadRequest("'stop_token_ids' must be an array of integers")
    for token_id in stop_ids:
        if not -2**31 <= token_id < 2**31:
            raise BadRequest("'stop_token_ids' holds an id outside the int32 range")
    params.stop_token_ids.extend(stop_ids)
    params.ignore_eos = _field(body, "ignore_eos", bool, False)
    read_constraints(body, params)
    return params


def _choice_counts(body: dict[str, Any], request: pb.GenerateRequest, stream: bool) -> tuple[int, int]:
    """(n, best_of): best_of choices are generated and the n most likely (by the sum of their tokens'
    logprobs) returned, so their logprobs are computed whether the client asked for them or not."""
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"'n' must be between 1 and {MAX_CHOICES}")
    best_of = _field(body, "best_of", int, n)
    if not n <= best_of <= MAX_CHOICES:
        raise BadRequest(f"'best_of' must be between n ({n}) and {MAX_CHOICES}")
    if best_of > n:
        if stream:
            raise BadRequest("'best_of' above 'n' cannot be streamed: the best choices are known only at the end")
        if not request.sampling.HasField("logprobs"):
            request.sampling.logprobs = 0
    return n, best_of


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # "completion" or "chat"
    generate: pb.GenerateRequest
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token when asked
    model: str = ""
    tools: ToolUse | None = None  # chat with tools: the output is read for tool calls
    several: tuple[pb.GenerateRequest, ...] = ()  # several prompts, or n > 1: one request per choice
    shared_prompt: bool = False  # n > 1: every choice has the same prompt (prefilled once)
    best_of: int = 1  # above `n`: best_of choices run, the n most likely are returned
    n: int = 1
    echo: bool = False  # completions: the prompt (and its logprobs) comes before each choice's text
    prompt_only: bool = False  # echo with max_tokens 0: one token is generated and dropped

    @property
    def generates(self) -> tuple[pb.GenerateRequest, ...]:
        """What to run: one request per choice, choice i from the i-th."""
        return self.several or (self.generate,)


def _common(body: Any, kind: str, default_max_tokens: int | None) -> tuple[pb.GenerateRequest, dict[str, Any]]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    refuse_unknown(body, _CHAT_FIELDS if kind == "chat" else _COMPLETION_FIELDS)
    _field(body, "user", str)  # accepted without effect, as documented
    request = pb.GenerateRequest(model=_field(body, "model", str, ""), sampling=_sampling(body, default_max_tokens))
    request_id = _field(body, "request_id", str, "")
    if request_id:
        request.request_id = request_id
    timeout = _field(body, "timeout", (int, float))
    if timeout is not None:
        request.timeout_seconds = float(timeout)
    _set(request, "priority", _field(body, "priority", int, 0), "priority")
    salt = _field(body, "cache_salt", str)
    if salt is not None:
        if not salt:
            raise BadRequest("'cache_salt' must be a non-empty string")
        request.cache_salt = salt
    return request, body


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    refuse_unknown(options, ("include_usage",), "stream_options.")
    usage = _field(options, "include_usage", bool, False)
    return stream, stream and usage


def _bad_values_are_bad_requests(parse: Callable[[Any], OpenAIRequest]) -> Callable[[Any], OpenAIRequest]:
    """protobuf raises a plain ValueError for an integer out of its field's range: that is the
    client's error too."""
    def checked(body: Any) -> OpenAIRequest:
        try:
            return parse(body)
        except BadRequest:
            raise
        except (ValueError, TypeError, OverflowError) as e:
            raise BadRequest(f"a value is out of range or of the wrong type: {e}") from e
    return checked


def _set_prompt(request: pb.GenerateRequest, prompt: Any) -> None:
    if isinstance(prompt, str) and prompt:
        request.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not -2**31 <= t < 2**31), None)  # negatives: the router says so
        if bad is not None:
            raise BadRequest("'prompt' holds a token id outside the int32 range")
        request.token_ids.ids.extend(prompt)
    else:
        raise BadRequest("'prompt' must be a non-empty string, an array of token ids (integers), or an array "
                         f"of up to {MAX_PROMPTS} of either")


@_bad_values_are_bad_requests
def parse_completion(body: Any) -> OpenAIRequest:
    echo = isinstance(body, dict) and _field(body, "echo", bool, False)
    limit = "max_completion_tokens" if isinstance(body, dict) and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    prompt_only = echo and type(body.get(limit)) is int and body[limit] == 0
    if prompt_only:  # how evaluation harnesses score a text: its prompt logprobs, nothing generated
        if _field(body, "min_tokens", int, 0) > 0:
            raise BadRequest("'min_tokens' must be 0 when 'max_tokens' is 0")
        body = {**body, limit: 1}
    request, body = _common(body, "completion", 16)
    prompt = body.get("prompt")
    several: tuple[pb.GenerateRequest, ...] = ()
    if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                or all(isinstance(p, list) for p in prompt)):
        if len(prompt) > MAX_PROMPTS:
            raise BadRequest(f"'prompt' holds {len(prompt)} prompts: at most {MAX_PROMPTS} per request")
        if len(prompt) > 1:  # one choice each, index i for prompt i; the same parameters
            several = tuple(pb.GenerateRequest() for _ in prompt)
        prompt = prompt[0]
    _set_prompt(request, prompt)
    if several:
        for i, (one, text) in enumerate(zip(several, body["prompt"], strict=True)):
            one.CopyFrom(request)
            one.ClearField("input")
            _set_prompt(one, text)
            if request.request_id:
                one.request_id = f"{request.request_id}-{i}"
    logprobs = _field(body, "logprobs", int)
    if logprobs is not None:
        if not 0 <= logprobs <= 20:
            raise BadRequest("'logprobs' must be between 0 and 20")
        request.sampling.logprobs = logprobs
        if echo:
            request.sampling.prompt_logprobs = logprobs
    stream, usage = _stream_flags(body)
    n, best_of = _choice_counts(body, request, stream)
    for one in several:
        one.sampling.CopyFrom(request.sampling)
    if several and best_of > 1:
        raise BadRequest("'n' and 'best_of' above 1 take one prompt: send the prompts as separate requests")
    return OpenAIRequest("completion", request, stream, usage, logprobs, request.model,
                         several=several or _choices(request, best_of), shared_prompt=best_of > 1,
                         best_of=best_of, n=n, echo=echo, prompt_only=prompt_only)


@_bad_values_are_bad_requests
def parse_chat(body: Any) -> OpenAIRequest:
    request, body = _common(body, "chat", None)
    request.chat.messages.extend(read_messages(body.get("messages")))
    tools = read_tools(body, request)
    logprobs = None
    top_logprobs = _field(body, "top_logprobs", int, 0)
    if not 0 <= top_logprobs <= 20:
        raise BadRequest("'top_logprobs' must be between 0 and 20")
    if _field(body, "logprobs", bool, False):
        logprobs = top_logprobs
        request.sampling.logprobs = logprobs
    stream, usage = _stream_flags(body)
    n, best_of = _choice_counts(body, request, stream)
    return OpenAIRequest("chat", request, stream, usage, logprobs, request.model, tools, _choices(request, best_of),
                         shared_prompt=best_of > 1, best_of=best_of, n=n)


def _choices(request: pb.GenerateRequest, n: int) -> tuple[pb.GenerateRequest, ...]:
    """n > 1: n copies of the request; choice i of a seeded one draws with seed + i (mod 2**64),
    so a seeded request gives the same n texts every time."""
    if n == 1:
        return ()
    copies = []
    for i in range(n):
        one = pb.GenerateRequest()
        one.CopyFrom(request)
        if request.sampling.HasField("seed"):
            one.sampling.seed = (request.sampling.seed + i) % 2**64
        if request.request_id:
            one.request_id = f"{request.request_id}-{i}"
        copies.append(one)
    return tuple(copies)


def read_messages(messages: Any) -> list[pb.ChatMessage]:
    """A chat's messages, the content's text parts joined; an assistant turn with `tool_calls`
    may have no content, a `tool` turn names the call it answers."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        refuse_unknown(message, _MESSAGE_FIELDS, f"messages[{i}].")
        calls = read_tool_calls(message, i)
        content = message.get("content")
        chat = pb.ChatMessage(role=message["role"], tool_calls=calls,
                              content="" if content is None and calls else _content(content, i))
        call_id = message.get("tool_call_id")
        if message["role"] == "tool" or call_id is not None:
            if message["role"] != "tool" or not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"messages[{i}]: a 'tool' message needs a string 'tool_call_id' (and only it)")
            chat.tool_call_id = call_id
        result.append(chat)
    return result


def _content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        for j, part in enumerate(content):
            refuse_unknown(part, ("type", "text"), f"messages[{index}].content[{j}].")
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{index}].content must be a string or an array of text parts")


def _tool_finish(use: ToolUse, reason: str | None) -> str | None:
    """A reply that ended by itself with calls: "tool_calls", except for a named function, where
    OpenAI (and vLLM) say "stop"."""
    return "tool_calls" if reason == "stop" and use.mode != "named" else reason


# -- responses ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptEcho:
    """What `echo` puts before a completion: the prompt's text and its first token (whose logprob is
    null: nothing comes before it)."""

    text: str
    first_token_id: int


# one logprobs entry of a completion: (token id, its logprob; None for the prompt's first token)
_Scored = tuple[int, "pb.TokenLogprob | None"]


class ResponseBuilder:
    """Turns the chunks of one request into OpenAI objects (streamed chunks or one final object)."""

    def __init__(self, request: OpenAIRequest, model: str, token_text: Callable[[int], str],
                 echo: PromptEcho | None = None) -> None:
        self.request = request
        self.model = model
        self.token_text = token_text
        self.echo = echo
        self.created = int(time.time())
        self.id = ""
        self.text: list[str] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.prompt_logprobs: list[_Scored] = []  # echo with logprobs: every prompt token
        self.absorbed = 0  # chunks taken in
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.tool_stream = ToolCallStream(request.tools) if request.tools is not None else None
        self.streamed_token_chars = 0  # text of the tokens whose logprobs were streamed (text_offset)

    @property
    def cumulative_logprob(self) -> float:
        """The sum of the generated tokens' logprobs (best_of's ranking)."""
        return math.fsum(lp.logprob for lp in self.logprobs)

    def absorb(self, chunk: pb.GenerateResponse) -> tuple[str, list[_Scored]]:
        """Take in a chunk; returns the text and logprobs entries it adds to the choice (with echo, the
        first chunk's start with the prompt's)."""
        prefix = "chatcmpl-" if self.request.kind == "chat" else "cmpl-"
        first, self.absorbed = self.absorbed == 0, self.absorbed + 1
        self.id = self.id or prefix + chunk.request_id
        text, scored = chunk.text, [(lp.token_id, lp) for lp in chunk.logprobs]
        if self.request.prompt_only:  # the one token generated is dropped
            text, scored = "", []
        self.logprobs.extend(lp for _, lp in scored if lp is not None)
        if first and self.echo is not None:
            self.prompt_logprobs = [(self.echo.first_token_id, None), *((lp.token_id, lp)
                                                                         for lp in chunk.prompt_logprobs)]
            text = self.echo.text + text
            scored = self.prompt_logprobs + scored if self.request.logprobs is not None else scored
        self.text.append(text)
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            # max_tokens 0: the hidden token may have been eos, but the client asked for no token
            self.finish_reason = "length" if self.request.prompt_only else _FINISH[chunk.finish_reason]
        if chunk.HasField("usage"):
            u = chunk.usage
            completion = 0 if self.request.prompt_only else u.completion_tokens
            self.usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": completion,
                          "total_tokens": u.prompt_tokens + completion,
                          "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}
        return text, scored

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _logprobs(self, items: list[_Scored], text_offset: int = 0) -> dict[str, Any] | None:
        """`text_offset`: where the first item's token starts in the completion's text."""
        if self.request.logprobs is None:
            return None
        if self.request.kind == "chat":
            return {"content": [{"token": self.token_text(lp.token_id), "logprob": lp.logprob,
                                 "bytes": list(self.token_text(lp.token_id).encode()),
                                 "top_logprobs": [{"token": self.token_text(t.token_id), "logprob": t.logprob,
                                                   "bytes": list(self.token_text(t.token_id).encode())}
                                                  for t in lp.top]} for _, lp in items if lp is not None]}
        tokens = [self.token_text(token_id) for token_id, _ in items]
        return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for _, lp in items],
                "top_logprobs": [{self.token_text(t.token_id): t.logprob for t in lp.top} if lp else None
                                 for _, lp in items],
                "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=text_offset))
                if tokens else []}

    def final(self) -> dict[str, Any]:
        text = "".join(self.text)
        if self.request.kind == "chat":
            body = self._head("chat.completion")
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.request.tools is not None:
                content, calls = parse_output(self.request.tools, text)
                if calls:
                    message.update(content=content.strip() or None, tool_calls=calls)
                    self.finish_reason = _tool_finish(self.request.tools, self.finish_reason)
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            body = self._head("text_completion")
            choice = {"index": 0, "text": text}
        generated: list[_Scored] = [] if self.request.prompt_only else [(lp.token_id, lp) for lp in self.logprobs]
        choice.update(logprobs=self._logprobs(self.prompt_logprobs + generated), finish_reason=self.finish_reason)
        body.update(choices=[choice], usage=self.usage)
        return body

    def stream_chunk(self, chunk: pb.GenerateResponse, first: bool) -> dict[str, Any]:
        text, scored = self.absorb(chunk)
        reason = self.finish_reason if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED else None
        if self.request.kind == "chat":
            body = self._head("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            delta["content"] = chunk.text
            if self.tool_stream is not None:
                delta["content"] = self.tool_stream.feed(chunk.text)
                if reason is not None:
                    rest, calls = self.tool_stream.finish()
                    delta["content"] += rest
                    if calls:
                        reason = _tool_finish(self.tool_stream.use, reason)
                fresh = self.tool_stream.new_calls()  # each call once its block is closed, the rest at the end
                if fresh:
                    delta["tool_calls"] = [{"index": i, **call} for i, call in fresh]
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            body = self._head("text_completion")
            choice = {"index": 0, "text": text}
        choice.update(logprobs=self._logprobs(scored, self.streamed_token_chars), finish_reason=reason)
        self.streamed_token_chars += sum(len(self.token_text(token_id)) for token_id, _ in scored)
        body["choices"] = [choice]
        return body

    def usage_chunk(self) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.request.kind == "chat" else "text_completion")
        body.update(choices=[], usage=self.usage)
        return body
