"""Runs sessions against a cluster at their arrival times, at most `concurrency` at once, for at
most `duration_s` (sessions not started by then are skipped; requests still running then are
cancelled and count as failed)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import grpc
from tqdm import tqdm

from bench.serve.arrivals import arrival_offsets
from bench.serve.client import Api, RequestResult, send_grpc, send_openai
from bench.serve.workloads import Session, Turn
from tandem.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class RunSpec:
    api: Api
    target: str  # OpenAI base URL (http://host:port) or gRPC host:port
    rate: float  # sessions per second; inf: all at once
    burstiness: float = 1.0
    concurrency: int = 64
    duration_s: float = 300.0
    timeout_s: float = 300.0
    seed: int = 0
    progress: bool = True


def _body(session: Session, turn: Turn, history: list[dict[str, str]]) -> dict:
    common = {"model": "", "max_tokens": turn.max_tokens, "temperature": 0.0, "ignore_eos": True}
    if session.chat:
        return {**common, "messages": history}
    return {**common, "prompt": list(turn.prompt_ids)}


def _grpc_request(session: Session, turn: Turn, history: list[dict[str, str]]) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(temperature=0.0, max_tokens=turn.max_tokens,
                                                                ignore_eos=True))
    if session.chat:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in history)
    else:
        request.token_ids.ids.extend(turn.prompt_ids)
    return request


async def run(sessions: list[Session], spec: RunSpec) -> tuple[list[RequestResult], float]:
    """All results (one per turn sent) and the wall time of the run in seconds."""
    offsets = arrival_offsets(len(sessions), spec.rate, spec.burstiness, spec.seed)
    gate = asyncio.Semaphore(spec.concurrency)
    results: list[RequestResult] = []
    total_turns = sum(len(s.turns) for s in sessions)
    bar = tqdm(total=total_turns, disable=not spec.progress, unit="req", leave=False)
    start = time.perf_counter()
    # a fresh connection per request: servers that close idle keep-alive connections (llama-server)
    # would otherwise fail requests sent on a connection they just closed
    http = (aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
            if spec.api == "openai" else None)
    channel = grpc.aio.insecure_channel(spec.target) if spec.api == "grpc" else None

    async def one(index: int, session: Session) -> None:
        delay = offsets[index] - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() - start > spec.duration_s:
            return
        async with gate:
            history = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
            for t, turn in enumerate(session.turns):
                if session.chat:
                    history.append({"role": "user", "content": turn.user_message})
                result = RequestResult(index, t, time.perf_counter() - start)
                results.append(result)
                if http is not None:
                    await send_openai(http, spec.target, _body(session, turn, history), result, start, spec.timeout_s)
                else:
                    assert channel is not None
                    await send_grpc(channel, _grpc_request(session, turn, history), result, start, spec.timeout_s)
                bar.update(1)
                if not result.ok:
                    return
                if session.chat:
                    history.append({"role": "assistant", "content": result.text})

    tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(sessions)]
    budget = spec.duration_s + spec.timeout_s
    _, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - start
    for r in results:
        if not r.ok and not r.error:
            r.error = "cancelled at the end of the run"
    bar.close()
    if http is not None:
        await http.close()
    if channel is not None:
        await channel.close()
    return results, elapsed
