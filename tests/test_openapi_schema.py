"""cluster/openapi.json agrees with the code, offline: the fields the parsers read are exactly the
schema's; a body the schema rejects (one field changed to each of many values) is refused by the
parsers and the router's validation; each bound the schema states is accepted; the router serves
the file at /openapi.json. tests/test_fuzz_http.py then holds a live cluster to it."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer

from cluster.openai_frontend import OPENAPI_SCHEMA, OpenAIFrontend
from cluster.openai_protocol import BadRequest, parse_chat, parse_completion
from cluster.router_core import RouterCore, RouterError
from tests.support.cluster import REPO

SCHEMA = json.loads(OPENAPI_SCHEMA)
COMPONENTS = SCHEMA["components"]["schemas"]
ABSENT = object()  # a candidate "value" that removes the field
PARSE = {"completion": parse_completion, "chat": parse_chat}
REQUEST = {"completion": "CompletionRequest", "chat": "ChatCompletionRequest"}
BASE: dict[str, dict[str, Any]] = {
    "completion": {"model": "m", "prompt": [1, 2, 3], "stream_options": {"include_usage": True}},
    "chat": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
             "stream_options": {"include_usage": True}},
}
# values tried in every field: each type, empties, and the edges the schema's bounds add
POOL: list[Any] = [ABSENT, None, True, False, 0, 1, -1, 2, 1.5, -0.5, 1e-9, 1e300, "x", "", [], [1], [-1], [1.5],
                   [True], ["x"], [""], [[1]], [[1], [2]], [2**31], {}, {"a": 1}, {"type": "text", "text": "t"}]


class _NoWorkers:
    def workers(self, *roles: str) -> list[Any]:
        return []

    def limits(self) -> tuple[int, int]:
        return 0, 16  # as cluster.worker_pool.WorkerPool with no worker


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [1, 2]

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        return [1, 2]


CORE = RouterCore(pool=_NoWorkers(), tokenizer=_Tokenizer(), policy=None,  # type: ignore[arg-type]
                  served_model_name="m", max_inflight=1, request_timeout_s=60.0)


def accepts(kind: str, body: Any) -> bool:
    """Whether the HTTP front would pass the body on to a worker: parsed, then prepared (no context limit here)."""
    try:
        CORE.prepare(PARSE[kind](body).generate)
    except (BadRequest, RouterError):
        return False
    return True


def schema_accepts(kind: str, body: Any) -> bool:
    root = {"$ref": f"#/components/schemas/{REQUEST[kind]}", "components": SCHEMA["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(body)


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    target: Any = changed
    for key in path[:-1]:
        target = target[key]
    if value is ABSENT:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return changed


def _walk(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    """Paths of every field in the base body, nested objects and the first item of arrays included."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*path, key)
            yield from _walk(inner, (*path, key))
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        yield from _walk(value[0], (*path, 0))


def field_paths(kind: str) -> list[tuple[str | int, ...]]:
    top = [(name,) for name in COMPONENTS[REQUEST[kind]]["properties"]]
    return top + [p for p in _walk(BASE[kind], ()) if len(p) > 1]


def _bounds(schema: dict[str, Any]) -> list[tuple[str, float | int]]:
    return [(key, schema[key]) for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            if key in schema]


def edge_values(schema: dict[str, Any]) -> list[Any]:
    """Each bound of a numeric field (or of its array's items), a step inside and a step outside."""
    values: list[Any] = []
    for holder, wrap in ((schema, False), (schema.get("items", {}), True)):
        integer = "integer" in holder.get("type", ())
        for _, bound in _bounds(holder):
            steps = (bound - 1, bound, bound + 1) if integer else (bound - 1e-9, bound, bound + 1e-9)
            values += [[v] if wrap else v for v in steps]
    return values


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = COMPONENTS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _property(kind: str, path: tuple[str | int, ...]) -> dict[str, Any]:
    """The schema of the field at `path` (an int: an array's item; of an anyOf, its array alternative)."""
    schema = _resolve(COMPONENTS[REQUEST[kind]])
    for key in path:
        if isinstance(key, int):
            schema = next((alt for alt in schema.get("anyOf", ()) if alt.get("type") == "array"), schema)
            schema = _resolve(schema["items"])
        else:
            schema = _resolve(schema["properties"][key])
    return schema


# -- the fields ---------------------------------------------------------------------------------------
class _Recording(dict):  # type: ignore[type-arg]
    """A JSON object that notes which of its keys the parser reads."""

    def __init__(self, value: dict[str, Any], seen: set[str], prefix: str) -> None:
        super().__init__({k: _record(v, seen, f"{prefix}{k}.") for k, v in value.items()})
        self.seen, self.prefix = seen, prefix

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(self.prefix + key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(self.prefix + key)
        return super().__getitem__(key)


def _record(value: Any, seen: set[str], prefix: str) -> Any:
    if isinstance(value, dict):
        return _Recording(value, seen, prefix)
    if isinstance(value, list):
        return [_record(v, seen, prefix + "[].") for v in value]
    return value


def _schema_fields(schema: dict[str, Any], prefix: str) -> set[str]:
    """Dotted names of every property, through $refs, array items and anyOf alternatives."""
    schema = _resolve(schema)
    names: set[str] = set()
    for name, inner in schema.get("properties", {}).items():
        names.add(prefix + name)
        names |= _schema_fields(inner, f"{prefix}{name}.")
    if isinstance(schema.get("items"), dict):
        names |= _schema_fields(schema["items"], prefix + "[].")
    for alternative in schema.get("anyOf", ()):
        names |= _schema_fields(alternative, prefix)
    return names


FULL = {
    "completion": {"model": "m", "request_id": "r", "timeout": 5, "priority": 1, "temperature": 0.5, "top_p": 0.9,
                   "top_k": 5, "min_p": 0.1, "min_tokens": 0, "max_tokens": 4, "max_completion_tokens": 4, "seed": 1,
                   "presence_penalty": 0.1, "frequency_penalty": 0.1, "repetition_penalty": 1.1,
                   "skip_special_tokens": True, "stop": ["x"], "stop_token_ids": [1], "ignore_eos": False, "n": 1,
                   "best_of": 1, "stream": True, "stream_options": {"include_usage": True}, "prompt": "hello",
                   "echo": False, "logprobs": 1, "logit_bias": {"1": 1.5}, "allowed_token_ids": None, "user": "u",
                   # one structured output (more, or with min_tokens or allowed_token_ids, is refused); the
                   # other spellings present as null, so read
                   "response_format": {"type": "json_schema", "json_schema": {
                       "name": "n", "description": "d", "schema": {"type": "object"}, "strict": True}},
                   "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
                   "structured_outputs": {"json": None, "regex": None, "choice": None, "grammar": None,
                                          "json_object": False}},
}
FULL["chat"] = {**{k: v for k, v in FULL["completion"].items() if k not in ("prompt", "echo", "logprobs")},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "logprobs": True,
                "top_logprobs": 2}
# a named tool_choice forces the output, so it comes without the other structured output
TOOLS_CHAT = {"messages": [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
    "tools": [{"type": "function", "function": {"name": "weather", "description": "d", "strict": True,
                                                "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "weather"}}, "parallel_tool_calls": False}
BODIES = {"completion": [FULL["completion"]], "chat": [FULL["chat"], TOOLS_CHAT]}


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_the_schema_names_exactly_the_fields_the_parser_reads(kind: str) -> None:
    """Every field the parser reads is in the schema and the schema has no field the parser ignores
    (over bodies that are each accepted)."""
    seen: set[str] = set()
    for body in BODIES[kind]:
        assert accepts(kind, _record(body, seen, ""))
    assert seen == _schema_fields(COMPONENTS[REQUEST[kind]], "")


# -- the values -----------------------------------------------------------------------------------------
CASES = [(kind, path) for kind in ("completion", "chat") for path in field_paths(kind)]


@pytest.mark.parametrize(("kind", "path"), CASES, ids=[f"{k}:{'.'.join(map(str, p))}" for k, p in CASES])
def test_what_the_schema_rejects_is_refused(kind: str, path: tuple[str | int, ...]) -> None:
    """The base body with one field set to each value: whenever the schema rejects it, so does the router."""
    wrongly_accepted = []
    for value in POOL + edge_values(_property(kind, path)):
        body = with_value(BASE[kind], path, value)
        if not schema_accepts(kind, body) and accepts(kind, body):
            wrongly_accepted.append(value)
    assert not wrongly_accepted, f"the schema rejects but the router accepts {path} = {wrongly_accepted}"


# a bound is only reachable with another field set too (min_tokens <= max_tokens)
# fields a bound needs beside it: min_tokens up to max_tokens; a completion's max_tokens 0 only with echo
COMPANIONS: dict[tuple[str, str], dict[str, Any]] = {
    **{(kind, "min_tokens"): {"max_tokens": 2**32 - 1} for kind in ("completion", "chat")},
    ("completion", "max_tokens"): {"echo": True}, ("completion", "max_completion_tokens"): {"echo": True}}
BOUNDS = [(kind, path, key, bound) for kind in ("completion", "chat") for path in field_paths(kind)
          for key, bound in _bounds(_property(kind, path))]


@pytest.mark.parametrize(("kind", "path", "key", "bound"), BOUNDS,
                         ids=[f"{k}:{p[-1]}:{key}" for k, p, key, _ in BOUNDS])
def test_each_bound_of_the_schema_is_accepted(kind: str, path: tuple[str | int, ...], key: str,
                                              bound: float) -> None:
    """The schema's bounds are the code's: a value at an inclusive bound (or just inside an exclusive one) passes."""
    value: float = bound
    if key.startswith("exclusive"):
        value = bound + 1e-9 if key == "exclusiveMinimum" else bound - 1e-9
    body = with_value({**BASE[kind], **COMPANIONS.get((kind, str(path[-1])), {})}, path, value)
    assert schema_accepts(kind, body) and accepts(kind, body), body


def test_token_id_bounds_of_prompts_and_stop_token_ids() -> None:
    """Token ids are int32 and not negative; the vocabulary is checked by the worker."""
    for field, wrap in (("prompt", lambda i: [i]), ("stop_token_ids", lambda i: [i])):
        assert accepts("completion", {**BASE["completion"], field: wrap(2**31 - 1)})
        assert not accepts("completion", {**BASE["completion"], field: wrap(2**31)})
        assert not accepts("completion", {**BASE["completion"], field: wrap(-1)})


def test_examples_in_the_schema_are_accepted() -> None:
    for kind in ("completion", "chat"):
        example = COMPONENTS[REQUEST[kind]]["example"]
        assert schema_accepts(kind, example) and accepts(kind, example)


def test_the_schema_is_valid_openapi() -> None:
    schema = schemathesis.openapi.from_path(REPO / "cluster" / "openapi.json")
    schema.validate()
    labels = sorted(result.ok().label for result in schema.get_all_operations())
    assert labels == ["GET /health", "GET /metrics", "GET /openapi.json", "GET /v1/models", "POST /detokenize",
                      "POST /tokenize", "POST /v1/chat/completions", "POST /v1/completions"]
    assert SCHEMA["openapi"].startswith("3.1")


async def test_the_router_serves_the_schema_which_lists_its_routes() -> None:
    app = OpenAIFrontend(CORE).app()
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    assert routes == {(method.upper(), path) for path, item in SCHEMA["paths"].items() for method in item}
    async with TestClient(TestServer(app)) as client:
        reply = await client.get("/openapi.json")
        assert reply.status == 200 and reply.content_type == "application/json"
        assert await reply.json() == SCHEMA
