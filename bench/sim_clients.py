"""Closed-loop gRPC clients for the simulated-cluster benches (bench.sim_scale, bench.sim_faults): each
client sends a greedy request of random prompt tokens, waits for its whole stream, and sends the next,
until told to stop; every request's outcome is recorded."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    ended: float
    code: str  # "OK" or the gRPC status name
    tokens: int  # streamed before it ended


@dataclass(frozen=True)
class ClientLoad:
    address: str
    clients: int
    prompt_tokens: int
    max_tokens: int
    vocab: int  # prompt ids are drawn from [10, vocab)
    seed: int = 0
    backoff_s: float = 0.0  # a client's pause after a failed request (as a real client's retry delay)


async def closed_loop(load: ClientLoad, done: Callable[[], bool], outcomes: list[Outcome]) -> None:
    """Every client sends one request after another until `done()`; each ends in `outcomes`."""
    rng = random.Random(load.seed)
    async with grpc.aio.insecure_channel(load.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def client() -> None:
            while not done():
                ids = [rng.randrange(10, load.vocab) for _ in range(load.prompt_tokens)]
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), timeout_seconds=60,
                                             sampling=pb.SamplingParameters(temperature=0.0, ignore_eos=True,
                                                                            max_tokens=load.max_tokens))
                started, tokens, code = time.monotonic(), 0, "OK"
                try:
                    async for chunk in stub.Generate(request, timeout=60):
                        tokens += len(chunk.token_ids)
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                outcomes.append(Outcome(started, time.monotonic(), code, tokens))
                if code != "OK" and load.backoff_s:
                    await asyncio.sleep(load.backoff_s)

        await asyncio.gather(*(client() for _ in range(load.clients)))


class BackgroundClients:
    """`closed_loop` on a thread of its own, from `start()` until `stop()` (which waits for the requests
    in flight)."""

    def __init__(self, load: ClientLoad) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._failure: BaseException | None = None  # what ended the clients early, re-raised by stop()
        self._thread = threading.Thread(target=self._run, args=(load,), daemon=True)

    def _run(self, load: ClientLoad) -> None:
        try:
            asyncio.run(closed_loop(load, self._stop.is_set, self.outcomes))
        except BaseException as e:  # handed to stop(): a silent stop would read as no load
            self._failure = e

    def start(self) -> BackgroundClients:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 90.0) -> None:
        """Raises if the clients failed, or are still running after `timeout_s` (their outcomes would
        still be changing)."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the clients' requests in flight did not end within {timeout_s} s")
        if self._failure is not None:
            raise RuntimeError("the background clients failed") from self._failure
