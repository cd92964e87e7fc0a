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
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster.json_body import decode_json
from cluster.openai_protocol import BadRequest, OpenAIRequest, ResponseBuilder, parse_chat, parse_completion
from cluster.openai_tokenize import detokenize, tokenize
from cluster.router_core import PreparedRequest, RouterCore, RouterError, healthy

log = logging.getLogger(__name__)
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
            every = [self.core.prepare(one) for one in parsed.generates]
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
        builder = ResponseBuilder(parsed, self.core.model_name, self._token_text)
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
        """Several prompts, or n > 1: each choice runs as its own request, choice i from request i;
        the status is settled once every one has its first chunk; usage is summed. With n > 1 the
        other choices start once choice 0 has its first token, on the decode worker that holds the
        prompt's KV, which prefills them from its prefix cache."""
        builders = [ResponseBuilder(parsed, self.core.model_name, self._token_text) for _ in prepared]
        async with contextlib.AsyncExitStack() as stack:  # closing cancels every request
            streams = [await stack.enter_async_context(contextlib.aclosing(self.core.generate(p)))
                       for p in prepared[:1 if parsed.shared_prompt else None]]
            try:
                firsts = [await anext(streams[0])]
                if parsed.shared_prompt:  # choice 0's first token: its prompt's KV is on that worker now
                    holder = self.core.serving_worker(prepared[0].internal_id)
                    streams += [await stack.enter_async_context(contextlib.aclosing(self.core.generate(
                        dataclasses.replace(p, follow_worker=holder)))) for p in prepared[1:]]
                firsts += [await anext(s) for s in streams[1:]]
            except RouterError as e:
                return self._refusal(e)
            except StopAsyncIteration:
                return error_response(500, "the worker ended the stream without a result")
            if not parsed.stream:
                try:
                    await asyncio.gather(*(_absorb_all(b, f, s) for b, f, s in zip(builders, firsts, streams,
                                                                                    strict=True)))
                except RouterError as e:
                    return self._refusal(e)
                body = builders[0].final()
                body["choices"] = [{**b.final()["choices"][0], "index": i} for i, b in enumerate(builders)]
                body["usage"] = _summed_usage(builders)
                return web.json_response(body)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

            async def pump(i: int) -> None:
                try:
                    events.put_nowait(_indexed(builders[i].stream_chunk(firsts[i], first=True), i, builders[0].id))
                    async for chunk in streams[i]:
                        events.put_nowait(_indexed(builders[i].stream_chunk(chunk, first=False), i, builders[0].id))
                except RouterError as e:
                    events.put_nowait(error_body(HTTP_STATUS.get(e.code, 500), e.message))
                finally:
                    events.put_nowait(None)

            pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
            try:
                done = 0
                while done < len(pumps):
                    event = await events.get()
                    if event is None:
                        done += 1
                    else:
                        await _event(response, event)
            finally:  # the client went away: stop reading before the streams are closed
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            if parsed.include_usage:
                await _event(response, {**builders[0].usage_chunk(), "usage": _summed_usage(builders)})
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
        return error_response(HTTP_STATUS.get(e.code, 500), e.message, self.core.retry_after_s)

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
            return web.json_response({"status": "ok", "workers": len(self.core.pool.workers())})
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


def _indexed(body: dict[str, Any], index: int, response_id: str) -> dict[str, Any]:
    """A choice's stream chunk as choice `index` of the one response."""
    body["id"] = response_id
    for choice in body["choices"]:
        choice["index"] = index
    return body


def _summed_usage(builders: list[ResponseBuilder]) -> dict[str, Any] | None:
    usages = [b.usage for b in builders]
    if any(u is None for u in usages):
        return None
    prompt = sum(u["prompt_tokens"] for u in usages if u)
    completion = sum(u["completion_tokens"] for u in usages if u)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages if u)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _event(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode())
