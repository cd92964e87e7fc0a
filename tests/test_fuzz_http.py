"""Fuzzing the router's OpenAI-compatible HTTP API from its own OpenAPI description
(cluster/openapi.json, served at /openapi.json) with schemathesis, against a live aggregated
cluster of the tiny model. Whatever the request: never a 5xx; the status, content type and body
conform to the schema (so every error is an OpenAI error object with a message); a body the schema
rejects is refused; and afterwards the worker still serves, with a clean pool. Then malformed
bodies the schema cannot describe: broken JSON, invalid UTF-8, NaN, huge numbers, deep nesting,
an oversized body.

Reproducible: hypothesis is derandomized and schemathesis seeded. Generated bodies ask for at most
MAX_TOKENS tokens (larger in-range max_tokens are lowered before sending, chat bodies without one
get one) so the tiny model never generates for long; out-of-range values are sent as generated."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.cluster import REPO, Cluster, assert_pools_clean, tandem_up, worker_status

pytestmark = pytest.mark.slow

MAX_TOKENS = 4
UINT32_MAX = 2**32 - 1
OWN_DEADLINE_S = 5.0  # a request with a shorter `timeout` may rightly end in 504


def no_server_error(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case) -> bool | None:
    """No 5xx, except 504 when the request's own short `timeout` ran out."""
    timeout = case.body.get("timeout") if isinstance(case.body, dict) else None
    if response.status_code == 504 and type(timeout) in (int, float) and timeout <= OWN_DEADLINE_S:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    with tandem_up("--prefill", "0", "--decode", "0", "--both", "1", "--model", str(tiny_llama_dir),
                   "--dtype", "float32", "--num-kv-blocks", "128") as running:
        yield running


# the file the router serves at /openapi.json (tests/test_openapi_schema.py checks they are the same);
# schemathesis' from_fixture does not run under pytest 9, so the schema is loaded here and given the URL per call
schema = schemathesis.openapi.from_path(REPO / "cluster" / "openapi.json", config=schemathesis.Config.from_dict({
    "seed": 6, "generation": {"mode": "all", "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}}}))


def bound_generation(case: schemathesis.Case) -> None:
    """At most MAX_TOKENS generated tokens: an in-range max_tokens above it is lowered, a chat body
    without one gets one. Values the schema rejects stay as they are (the server must refuse them)."""
    if not isinstance(case.body, dict):
        return
    asked = False
    for name in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(name)
        if type(value) is int and MAX_TOKENS < value <= UINT32_MAX:
            case.body[name] = MAX_TOKENS
        asked |= value is not None
    if not asked and case.path == "/v1/chat/completions":
        case.body["max_tokens"] = MAX_TOKENS


@schema.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_a_conforming_answer(case: schemathesis.Case, cluster: Cluster) -> None:
    bound_generation(case)
    case.call_and_validate(base_url=cluster.http_url, checks=CHECKS, timeout=60)


# -- what the schema cannot describe ------------------------------------------------------------------
def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


PROMPT = b'{"prompt": "hi", "max_tokens": 2, '
MALFORMED = [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"prompt": "hi"', "not valid JSON"),
    (b'{"prompt": "hi"} trailing', "not valid JSON"),
    (b'\xff\xfe{"prompt": "hi"}', "not UTF-8"),
    (b'{"prompt": "hi \xc3\x28"}', "not UTF-8"),
    (b'\xef\xbb\xbf{"prompt": "hi"}', "BOM"),
    (PROMPT + b'"temperature": NaN}', "NaN is not a JSON value"),
    (PROMPT + b'"temperature": Infinity}', "Infinity is not a JSON value"),
    (PROMPT + b'"timeout": -Infinity}', "-Infinity is not a JSON value"),
    (PROMPT + b'"temperature": 1e999}', "out of range"),
    (PROMPT + b'"seed": ' + b"9" * 5000 + b"}", "too many digits"),
    (PROMPT + b'"timeout": ' + b"9" * 400 + b"}", "'timeout' must be a finite number"),
    (PROMPT + b'"temperature": ' + b"9" * 400 + b"}", "'temperature' must be a finite number"),
    (PROMPT + b'"temperature": 1e39}', "'temperature' is out of range"),
    (PROMPT + b'"seed": 18446744073709551616}', "'seed' is out of range"),
    (PROMPT + b'"top_k": -2147483649}', "'top_k'"),
    (PROMPT + b'"priority": 2147483648}', "'priority' is out of range"),
    (PROMPT + b'"stop_token_ids": [4294967296]}', "'stop_token_ids'"),
    (b'{"prompt": [4294967296], "max_tokens": 2}', "'prompt'"),
    (PROMPT + b'"max_tokens": 4294967296}', "'max_tokens' is out of range"),
    (PROMPT + b'"top_p": 1.00000001}', "top_p"),
    (PROMPT + b'"stop": ["\\ud800"]}', "surrogates"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nests too deeply"),
    (b'"just a string"', "must be a JSON object"),
]


@pytest.mark.parametrize(("body", "needle"), MALFORMED, ids=[repr(b[:40]) for b, _ in MALFORMED])
def test_malformed_bodies_are_400(cluster: Cluster, body: bytes, needle: str) -> None:
    status, reply = _post(f"{cluster.http_url}/v1/completions", body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
    assert needle in reply["error"]["message"], reply


def test_an_unknown_charset_is_ignored_for_utf8_json(cluster: Cluster) -> None:
    """JSON is UTF-8 (RFC 8259): a charset parameter naming no codec does not make it a server error."""
    status, reply = _post(f"{cluster.http_url}/v1/completions", b'{"prompt": "hi", "max_tokens": 2}',
                          "application/json; charset=x-no-such-codec")
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length", reply
    status, reply = _post(f"{cluster.http_url}/v1/chat/completions", b"\x00\x01",
                          "text/plain; charset=x-no-such-codec")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]


def test_an_oversized_body_is_413_without_reading_it_all(cluster: Cluster) -> None:
    """Over the 16 MiB limit: 413 with an OpenAI error, before the body is parsed."""
    body = b'{"prompt": "' + b"a" * (17 << 20) + b'"}'
    status, reply = _post(f"{cluster.http_url}/v1/completions", body)
    assert status == 413 and "limit" in reply["error"]["message"], reply


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, "no-such-model"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 10**6}, 400, "'n'"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 10**6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": -1}, 400,
     "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1e-9}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 10, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "timeout": 0}, 400, "timeout"),
    ("/v1/completions", {"prompt": "hi", "timeout": -3.5}, 400, "timeout"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "include_usage"),
    ("/v1/completions", {"prompt": [511, 512]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": [-1]}, 400, "negative"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [512]}, 400, "vocab"),
])
def test_absurd_values_are_refused_with_a_message(cluster: Cluster, path: str, body: dict[str, Any], status: int,
                                                   needle: str) -> None:
    code, reply = _post(cluster.http_url + path, json.dumps(body).encode())
    assert code == status and needle in reply["error"]["message"], reply


def test_a_huge_max_tokens_in_range_ends_at_the_context(cluster: Cluster) -> None:
    """The largest max_tokens the schema allows is served: the sequence ends at the context length."""
    status, reply = _post(f"{cluster.http_url}/v1/completions",
                          json.dumps({"prompt": list(range(5, 205)), "max_tokens": UINT32_MAX, "ignore_eos": True,
                                      "temperature": 0}).encode())
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length", reply
    assert reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] <= 256


def test_chat_without_max_tokens_may_ask_for_more_than_16_min_tokens(cluster: Cluster) -> None:
    """Regression: chat without max_tokens (the rest of the context) was validated as if max_tokens
    were 16, so min_tokens 20 was refused."""
    message = {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20}  # 236 tokens
    status, reply = _post(f"{cluster.http_url}/v1/chat/completions",
                          json.dumps({"messages": [message], "min_tokens": 20, "temperature": 0}).encode())
    assert status == 200 and reply["usage"]["completion_tokens"] >= 20, reply
    assert reply["usage"]["total_tokens"] <= 256


def test_the_worker_still_serves_with_a_clean_pool(cluster: Cluster) -> None:
    """After everything above (run last in this module)."""
    status, reply = _post(f"{cluster.http_url}/v1/chat/completions",
                          json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}).encode())
    assert status == 200 and reply["usage"]["completion_tokens"] == 3, reply

    async def check() -> None:
        for worker in cluster.workers:
            assert (await worker_status(worker)).pool_integrity_ok
        await assert_pools_clean(cluster)
    asyncio.run(check())


def test_unknown_keys_pass_only_when_null_as_the_schema_says(cluster: Cluster) -> None:
    """The schema's `additionalProperties: {"type": "null"}` is the server's rule (a key set to null
    asks for nothing), in nested objects too: the case this suite's fuzzer once found accepted while
    the schema said otherwise; a prompt body with `"messages": null` is a prompt body."""
    part = {"type": "text", "text": "hi"}
    null_extra = {"messages": [{"role": "user", "content": [{**part, "": None}]}]}
    status, reply = _post(f"{cluster.http_url}/tokenize", json.dumps(null_extra).encode())
    assert status == 200 and reply["count"] > 0, reply
    set_extra = {"messages": [{"role": "user", "content": [{**part, "x": 1}]}]}
    status, reply = _post(f"{cluster.http_url}/tokenize", json.dumps(set_extra).encode())
    assert status == 400 and "'messages[0].content[0].x'" in reply["error"]["message"], reply
    status, reply = _post(f"{cluster.http_url}/tokenize", b'{"prompt": "hi", "messages": null}')
    assert status == 200 and reply["count"] > 0, reply
    schema = json.loads((REPO / "cluster" / "openapi.json").read_text())
    assert schema["components"]["schemas"]["TextPart"]["additionalProperties"] == {"type": "null"}
