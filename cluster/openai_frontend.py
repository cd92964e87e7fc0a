"""The OpenAI-compatible HTTP API of the router (aiohttp): /v1/completions, /v1/chat/completions
(SSE streaming or not), /v1/models, /tokenize and /detokenize (vLLM's, answered by the router's
tokenizer), /health, /metrics, and its OpenAPI description at /openapi.json.

Errors are OpenAI-shaped JSON ({"error": {"message", "type", "code"}}) with the HTTP status of the
router's gRPC status. A streamed request's status is settled before the first byte: the handler
waits for the first chunk, so 429/503 arrive as statuses, not inside the stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster.api_keys import caller_of
from cluster.json_body import decode_json
from cluster.openai_protocol import (
    BadRequest,
    OpenAIRequest,
    PromptEcho,
    ResponseBuilder,
    parse_chat,
    parse_completion,
)
from cluster.openai_tokenize import detokenize, tokenize
from cluster.router_core import PreparedRequest, RouterCore, RouterError, healthy, without_prompt_logprobs
from common.worker_record import ROLES

log = logging.getLogger(__name__)
T = TypeVar("T")
# this API's OpenAPI 3.1 description, served at /openapi.json (tests/test_openapi_schema.py keeps it true)
OPENAPI_SCHEMA = importlib.resources.files("cluster").joinpath("openapi.json").read_bytes()

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNIMPLEMENTED: 501,
               grpc.StatusCode.CANCELLED: 499}
_RETRYABLE = {429, 503}  # statuses that carry Retry-After
_ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": None,
                      "code": status}}


def error_response(status: int, message: str, retry_after_s: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None and status in _RETRYABLE else None
    return web.json_response(error_body(status, message), status=status, headers=headers)


class OpenAIFrontend:
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/v1/models", self.models), web.get("/health", self.health),
                        web.get("/metrics", self.metrics), web.get("/openapi.json", self.openapi),
                        web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize)])
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_chat)

    async def _serve(self, request: web.Request, parse: Any) -> web.StreamResponse:
        try:
            raw = await request.read()  # stops at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the request body is over the limit of {request.client_max_size} bytes")
        context = self.core.max_model_len  # 0: no worker yet (generate will say so)
        try:
            parsed: OpenAIRequest = parse(decode_json(raw))
            # chat without max_tokens runs to the end of the context: validated as the context's length
            # (min_tokens may be above 16), then cut to what the prompt leaves
            to_the_end = parsed.kind == "chat" and not parsed.generate.sampling.HasField("max_tokens") and context
            if to_the_end:
                for one in parsed.generates:
                    one.sampling.max_tokens = context
            every = [self.core.prepare(one, caller=caller_of(request)) for one in parsed.generates]
        except BadRequest as e:
            return error_response(400, str(e))
        except RouterError as e:
            return self._refusal(e)
        if to_the_end:
            for ready in every:
                ready.sampling.max_tokens = context - len(ready.prompt_token_ids)
        if parsed.several:
            return await self._serve_several(request, parsed, every)
        prepared = every[0]
        builder = self._builder(parsed, parsed.generate, prepared)
        async with contextlib.aclosing(self.core.generate(prepared)) as chunks:  # closing cancels the request
            try:
                first = await anext(chunks)
            except RouterError as e:
                return self._refusal(e)
            except StopAsyncIteration:
                return error_response(500, "the worker ended the stream without a result")
            if not parsed.stream:
                return await self._whole(builder, first, chunks)
            return await self._sse(request, parsed, builder, first, chunks)

    async def _serve_several(self, request: web.Request, parsed: OpenAIRequest,
                             prepared: list[PreparedRequest]) -> web.StreamResponse:
        """Several prompts, or n > 1: each choice runs as its own request, choice i from request i,
        all started at once; the status is settled once every one has its first chunk, and the first
        error ends them all. With n > 1 the other choices start once choice 0 has its first token, on
        the decode worker that holds the prompt's KV, which prefills them from its prefix cache."""
        if len(prepared) > self.core.max_inflight:
            return error_response(400, f"{len(prepared)} choices are more than the router runs at once "
                                       f"({self.core.max_inflight}): ask for fewer")
        key_limit = self.core.keys.limits.of(prepared[0].caller.key_name).max_inflight
        if key_limit is not None and len(prepared) > key_limit:
            return error_response(400, f"{len(prepared)} choices are more than this API key may run at once "
                                       f"({key_limit}): ask for fewer")
        builders = [self._builder(parsed, one, ready) for one, ready in zip(parsed.generates, prepared, strict=True)]
        response_id = ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + (
            parsed.generate.request_id or prepared[0].request_id)
        for builder in builders:
            builder.id = response_id
        async with contextlib.AsyncExitStack() as stack:  # closing cancels every request
            async def start(one: PreparedRequest) -> Any:
                return await stack.enter_async_context(contextlib.aclosing(self.core.generate(one)))
            streams = [await start(p) for p in (prepared[:1] if parsed.shared_prompt else prepared)]
            try:
                firsts = await _all_or_none([anext(s) for s in streams])
                if parsed.shared_prompt:  # choice 0's first token: its prompt's KV is on that worker now
                    holder = self.core.serving_worker(prepared[0].internal_id)
                    # the followers read the prompt from the prefix cache: its logprobs are choice 0's
                    followers = [await start(dataclasses.replace(p, follow_worker=holder,
                                                                 sampling=without_prompt_logprobs(p.sampling)))
                                 for p in prepared[1:]]
                    more = await _all_or_none([anext(s) for s in followers])
                    for chunk in more:
                        chunk.prompt_logprobs.extend(firsts[0].prompt_logprobs)
                    firsts += more
                    streams += followers
                if not parsed.stream:
                    await _all_or_none([_absorb_all(b, f, s) for b, f, s in zip(builders, firsts, streams,
                                                                                 strict=True)])
            except RouterError as e:
                return self._refusal(e)
            except StopAsyncIteration:
                return error_response(500, "the worker ended the stream without a result")
            if not parsed.stream:
                body = builders[0].final()
                body["usage"] = _usage(builders, parsed.shared_prompt)  # best_of: every choice generated counts
                kept = builders
                if parsed.best_of > parsed.n:  # the n most likely, best first
                    kept = sorted(builders, key=lambda b: b.cumulative_logprob, reverse=True)[:parsed.n]
                body["choices"] = [{**b.final()["choices"][0], "index": i} for i, b in enumerate(kept)]
                return web.json_response(body)
            return await self._sse_several(request, parsed, builders, firsts, streams)

    async def _sse_several(self, request: web.Request, parsed: OpenAIRequest, builders: list[ResponseBuilder],
                           firsts: list[Any], streams: list[Any]) -> web.StreamResponse:
        """The choices' chunks interleaved as they come; the first error is the stream's last event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()  # (choice, chunk or None at its end); (-1, error)

        async def pump(i: int) -> None:
            try:
                events.put_nowait((i, firsts[i]))
                async for chunk in streams[i]:
                    events.put_nowait((i, chunk))
                events.put_nowait((i, None))
            except RouterError as e:
                events.put_nowait((-1, error_body(HTTP_STATUS.get(e.code, 500), e.message)))
            except Exception as e:  # reported to the client as the stream's last event, and logged
                log.exception("choice %d of %s failed", i, builders[i].id)
                events.put_nowait((-1, error_body(500, f"choice {i} failed: {e}")))

        pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        failed = False
        try:
            running, sent_first = len(pumps), [False] * len(pumps)
            while running and not failed:
                i, item = await events.get()
                if i < 0:
                    await _event(response, item)
                    failed = True
                elif item is None:
                    running -= 1
                else:
                    await _event(response, _indexed(builders[i].stream_chunk(item, first=not sent_first[i]), i))
                    sent_first[i] = True
        finally:  # an error, or the client went away: stop every choice before its stream is closed
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        if parsed.include_usage and not failed:
            await _event(response, {**builders[0].usage_chunk(), "usage": _usage(builders, parsed.shared_prompt)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _whole(self, builder: ResponseBuilder, first: Any, chunks: Any) -> web.Response:
        builder.absorb(first)
        try:
            async for chunk in chunks:
                builder.absorb(chunk)
        except RouterError as e:
            return self._refusal(e)
        return web.json_response(builder.final())

    async def _sse(self, request: web.Request, parsed: OpenAIRequest, builder: ResponseBuilder, first: Any,
                   chunks: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await _event(response, builder.stream_chunk(first, first=True))
            async for chunk in chunks:
                await _event(response, builder.stream_chunk(chunk, first=False))
            if parsed.include_usage:
                await _event(response, builder.usage_chunk())
        except RouterError as e:
            await _event(response, error_body(HTTP_STATUS.get(e.code, 500), e.message))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _refusal(self, e: RouterError) -> web.Response:
        return error_response(HTTP_STATUS.get(e.code, 500), e.message, e.retry_after_s or self.core.retry_after_s)

    def _builder(self, parsed: OpenAIRequest, one: Any, prepared: PreparedRequest) -> ResponseBuilder:
        echo = None
        if parsed.echo:  # the prompt as sent, or its token ids' text
            text = one.text if one.WhichOneof("input") == "text" else self.core.tokenizer.decode(
                prepared.prompt_token_ids, skip_special_tokens=False)
            echo = PromptEcho(text, prepared.prompt_token_ids[0])
        return ResponseBuilder(parsed, self.core.model_name, self._token_text, echo)

    def _token_text(self, token_id: int) -> str:
        return self.core.tokenizer.decode([token_id], skip_special_tokens=False)

    async def tokenize(self, request: web.Request) -> web.Response:
        return await self._tokenizer_call(request, lambda body: tokenize(body, self.core.tokenizer,
                                                                          self.core.max_model_len))

    async def detokenize(self, request: web.Request) -> web.Response:
        return await self._tokenizer_call(request, lambda body: detokenize(body, self.core.tokenizer))

    async def _tokenizer_call(self, request: web.Request,
                              answer: Callable[[Any], tuple[str, dict[str, Any]]]) -> web.Response:
        """The router's tokenizer answers; no worker is involved."""
        try:
            model, body = answer(decode_json(await request.read()))
            self.core.check_model(model)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the request body is over the limit of {request.client_max_size} bytes")
        except BadRequest as e:
            return error_response(400, str(e))
        except RouterError as e:
            return self._refusal(e)
        return web.json_response(body)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.core.model_name, "object": "model", "created": int(time.time()), "owned_by": "tandem",
            "max_model_len": self.core.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        if healthy(self.core.pool):
            pools = {role: len(self.core.pool.workers(role)) for role in ROLES}
            return web.json_response({"status": "ok", "workers": sum(pools.values()), "pools": pools})
        return error_response(503, "no decode (or aggregated) worker is available", self.core.retry_after_s)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_SCHEMA, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response


async def _absorb_all(builder: ResponseBuilder, first: Any, chunks: Any) -> None:
    builder.absorb(first)
    async for chunk in chunks:
        builder.absorb(chunk)


def _indexed(body: dict[str, Any], index: int) -> dict[str, Any]:
    """A choice's stream chunk as choice `index` of the one response."""
    for choice in body["choices"]:
        choice["index"] = index
    return body


async def _all_or_none(awaitables: list[Awaitable[T]]) -> list[T]:
    """Every result, run concurrently; the first failure cancels (and waits for) the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task.done() else None
            if error is not None:
                raise error
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(builders: list[ResponseBuilder], shared_prompt: bool) -> dict[str, Any] | None:
    """The choices' usage: completion tokens summed; prompt (and cached) tokens summed over several
    prompts, counted once for n choices of one prompt (as OpenAI bills them)."""
    usages = [b.usage for b in builders]
    counted = [u for u in usages if u is not None]
    if len(counted) < len(usages):
        return None
    prompts = counted[:1] if shared_prompt else counted
    prompt = sum(u["prompt_tokens"] for u in prompts)
    completion = sum(u["completion_tokens"] for u in counted)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                           for u in prompts)}}


async def _event(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode())
