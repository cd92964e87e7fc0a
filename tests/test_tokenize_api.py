"""/tokenize and /detokenize on a router with no worker at all (the router's own tokenizer
answers): the default model's ids, the chat form rendered as chat completions render it, the
round trip, and refusals naming what is wrong. The responses match cluster/openapi.json."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cluster.openai_frontend import OPENAPI_SCHEMA, OpenAIFrontend
from cluster.router_core import RouterCore
from engine.tokenizer import Tokenizer

SCHEMA = json.loads(OPENAPI_SCHEMA)


class _NoWorkers:
    def workers(self, *roles: str) -> list[Any]:
        return []

    def limits(self) -> tuple[int, int]:
        return 0, 16  # as cluster.worker_pool.WorkerPool with no worker


@pytest.fixture(scope="module")
def tokenizer(default_model_path) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_source(default_model_path)


@pytest.fixture
async def client(tokenizer: Tokenizer) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    core = RouterCore(pool=_NoWorkers(), tokenizer=tokenizer, policy=None,  # type: ignore[arg-type]
                      served_model_name="SmolLM2", max_inflight=1, request_timeout_s=60.0)
    async with TestClient(TestServer(OpenAIFrontend(core).app())) as running:
        yield running


def conforms(body: Any, component: str) -> None:
    root = {"$ref": f"#/components/schemas/{component}", "components": SCHEMA["components"]}
    jsonschema.Draft202012Validator(root).validate(body)


async def test_tokenize_prompt_and_chat(client: TestClient, tokenizer: Tokenizer) -> None:  # type: ignore[type-arg]
    reply = await client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    assert reply.status == 200
    body = await reply.json()
    conforms(body, "TokenizeResponse")
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert "".join(body["token_strs"]).replace("Ġ", " ") == "Hello world"
    messages = [{"role": "user", "content": "Hi there"}]
    chat = await (await client.post("/tokenize", json={"messages": messages, "model": "SmolLM2"})).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages) and chat["token_strs"] is None
    bare = await (await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})).json()
    assert bare["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=False) != chat["tokens"]


async def test_detokenize_round_trip(client: TestClient, tokenizer: Tokenizer) -> None:  # type: ignore[type-arg]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Où est la gare?"}])
    reply = await client.post("/detokenize", json={"tokens": ids})
    assert reply.status == 200
    body = await reply.json()
    conforms(body, "DetokenizeResponse")
    assert body["prompt"] == tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>" in body["prompt"] and "Où est la gare?" in body["prompt"]


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/tokenize", {"prompt": 5}, 400, "'prompt'"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x", "name": "n"}]}, 400, "messages[0].name"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "not served"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "outside the vocabulary"),
    ("/detokenize", {"tokens": [True]}, 400, "'tokens'"),
    ("/detokenize", [1, 2], 400, "JSON object"),
])
async def test_refusals(client: TestClient, path: str, body: Any, status: int, words: str) -> None:  # type: ignore[type-arg]
    reply = await client.post(path, json=body)
    assert reply.status == status
    assert words in (await reply.json())["error"]["message"]
