"""`tandem profile`'s measurement (cluster/planner/profiler.py) against fake gRPC servers whose
per-token delay grows with the requests they serve at once: the points it records (per worker),
where it stops rising, what it sends through the router's and a worker's service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cluster.planner.profiler import measure
from cluster.planner.settings import ProfileSettings
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc, worker_pb2_grpc

BASE_S = 0.002  # per token, alone; ×(1 + running/8) with more running


class FakeEngine:
    def __init__(self) -> None:
        self.running = 0
        self.seen: list[tuple[list[int], int, tuple[tuple[str, str], ...]]] = []

    async def stream(self, ids: list[int], max_tokens: int, metadata: tuple[tuple[str, str], ...]
                     ) -> AsyncIterator[pb.GenerateResponse]:
        self.seen.append((ids, max_tokens, metadata))
        self.running += 1
        try:
            await asyncio.sleep(len(ids) * 1e-5)  # prefill
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(BASE_S * (1 + self.running / 8))
                yield pb.GenerateResponse(token_ids=[5])
        finally:
            self.running -= 1


class Router(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        metadata = tuple((m.key, m.value) for m in context.invocation_metadata() if m.key == "authorization")
        async for chunk in self.engine.stream(list(request.token_ids.ids), request.sampling.max_tokens, metadata):
            yield chunk


class Worker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        assert request.request_id and not request.prefill and request.sampling.ignore_eos
        async for chunk in self.engine.stream(list(request.prompt_token_ids), request.sampling.max_tokens, ()):
            yield chunk


async def _serve(via: str, engine: FakeEngine) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    if via == "router":
        inference_pb2_grpc.add_InferenceServicer_to_server(Router(engine), server)
    else:
        worker_pb2_grpc.add_WorkerServicer_to_server(Worker(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_profile_through_the_router_per_worker() -> None:
    engine = FakeEngine()
    server, address = await _serve("router", engine)
    try:
        profile = await measure(ProfileSettings(
            address=address, prefill_workers=2, decode_workers=2, prompt_tokens=40, prefill_concurrency=2,
            prefill_s=0.5, decode_batches="1,4,16", decode_tokens=20, decode_prompt_tokens=6, step_s=1.0,
            api_key="k-1"))
    finally:
        await server.stop(None)
    assert profile.prefill_tokens_per_s is not None and profile.prefill_tokens_per_s > 0
    assert [p.batch for p in profile.decode] == [0.5, 2.0, 8.0]  # streams per decode worker
    # 16 running: ×2.7 the lone token's delay (loose bounds: a busy machine adds its own delays)
    assert 0 < profile.decode[0].itl_at(0.5) < profile.decode[2].itl_at(0.9)
    assert all(set(p.itl_s) == {"0.5", "0.9", "0.99"} for p in profile.decode)
    tokens = [p.tokens_per_s for p in profile.decode]
    assert tokens == sorted(tokens) and tokens[0] < 1 / BASE_S / 2  # per worker: at most half of one stream's
    assert {max_tokens for _, max_tokens, _ in engine.seen} == {1, 20}
    assert {len(ids) for ids, max_tokens, _ in engine.seen if max_tokens == 1} == {40}
    assert all(4 <= i < 500 for ids, _, _ in engine.seen for i in ids)
    assert {metadata for _, _, metadata in engine.seen} == {(("authorization", "Bearer k-1"),)}
    assert profile.meta["via"] == "router"


async def test_profile_of_one_worker_stops_rising_past_max_itl() -> None:
    engine = FakeEngine()
    server, address = await _serve("worker", engine)
    try:
        profile = await measure(ProfileSettings(address=address, via="worker", prefill_s=0, decode_batches="1,2,4",
                                                decode_tokens=10, step_s=0.6, max_itl_s=0.001))
    finally:
        await server.stop(None)
    assert profile.prefill_tokens_per_s is None  # skipped
    assert [p.batch for p in profile.decode] == [1.0]  # its ITL passed 1 ms: no larger batch
