"""Streams through a cluster whose decode worker is SIGKILLed mid-stream: what each client received."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field

import grpc

from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc


@dataclass
class Received:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    cut: int = 0  # tokens received when the worker was killed


async def stream_through_kill(grpc_address: str, requests: list[pb.GenerateRequest], victim_pid: int,
                              kill_after: int = 3, timeout_s: float = 120.0) -> list[Received]:
    """Starts every request, SIGKILLs `victim_pid` once each stream has `kill_after` tokens, and
    returns what each stream received by its end."""
    received = [Received() for _ in requests]
    all_started = asyncio.Event()

    async def consume(i: int, stub: inference_pb2_grpc.InferenceStub) -> None:
        async for chunk in stub.Generate(requests[i], timeout=timeout_s):
            got = received[i]
            got.token_ids += chunk.token_ids
            got.text += chunk.text
            got.finish_reason = chunk.finish_reason or got.finish_reason
            if all(len(r.token_ids) >= kill_after for r in received):
                all_started.set()

    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streams = [asyncio.create_task(consume(i, stub)) for i in range(len(requests))]
        await asyncio.wait_for(all_started.wait(), 60)
        os.kill(victim_pid, signal.SIGKILL)
        for r in received:
            r.cut = len(r.token_ids)
        await asyncio.wait_for(asyncio.gather(*streams), timeout_s)
    return received
