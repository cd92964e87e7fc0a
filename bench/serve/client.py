"""One request against a cluster, timed: the OpenAI HTTP API (SSE) or gRPC tandem.v1.Inference.

Times are `time.perf_counter()` seconds. TTFT: send to the first chunk that carries output; ITL:
every gap between two such chunks (a chunk may carry more than one token); E2E: send to the end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import grpc

from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc

Api = Literal["openai", "grpc"]


@dataclass
class RequestResult:
    session: int
    turn: int
    sent_at: float  # seconds since the benchmark started
    ok: bool = False  # complete: the stream ended with a finish reason (a truncated stream is a failure)
    error: str = ""
    finish_reason: str = ""
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # since the benchmark started
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None for single-token answers)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _record_chunk(result: RequestResult, sent: float, start: float, now: float) -> None:
    if result.ttft is None:
        result.ttft = now - sent
    else:
        result.itl.append(now - (start + result.chunk_times[-1]))
    result.chunk_times.append(now - start)


def record_outcome(result: RequestResult) -> None:
    """A request succeeded only if its stream completed: a finish reason other than abort, and tokens."""
    result.ok = bool(result.finish_reason) and result.finish_reason != "abort" and result.output_tokens > 0
    if not result.ok:
        result.error = result.error or (f"the stream ended with finish reason {result.finish_reason!r}"
                                        if result.finish_reason else "the stream ended without a finish reason")


async def send_openai(session: aiohttp.ClientSession, base_url: str, body: dict, result: RequestResult,
                      start: float, timeout_s: float) -> None:
    """POST a streaming completion (`messages` in the body: chat) and fill `result`."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    try:
        async with session.post(base_url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
            if reply.status != 200:
                result.error = f"HTTP {reply.status}: {(await reply.text())[:200]}"
                return
            async for raw in reply.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                    return
                for choice in event.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        _record_chunk(result, sent, start, time.perf_counter())
                        result.text += text
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        result.e2e = time.perf_counter() - sent
        record_outcome(result)
    except (aiohttp.ClientError, TimeoutError) as e:
        result.error = f"{type(e).__name__}: {e}"


async def send_grpc(channel: grpc.aio.Channel, request: pb.GenerateRequest, result: RequestResult, start: float,
                    timeout_s: float) -> None:
    sent = time.perf_counter()
    try:
        async for chunk in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=timeout_s):
            if chunk.token_ids:
                _record_chunk(result, sent, start, time.perf_counter())
                result.text += chunk.text
            if chunk.HasField("usage"):
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                result.cached_tokens = chunk.usage.cached_prompt_tokens
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                result.finish_reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
        result.e2e = time.perf_counter() - sent
        record_outcome(result)
    except grpc.aio.AioRpcError as e:
        result.error = f"{e.code().name}: {e.details()}"
