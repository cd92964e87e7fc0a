"""The decode worker's gRPC service over a real socket: streams equal the engine alone, bad input
gets INVALID_ARGUMENT and loses nothing, cancelling a stream frees the request's blocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from decode_worker.servicer import DecodeWorkerServicer
from engine import LLM, EngineConfig, SamplingParams
from engine.async_engine import AsyncEngine
from engine.block_manager import hash_blocks
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2, worker_pb2_grpc
from worker_runtime.kv_events import KVEventHub

PROMPTS = [[5, 9, 13, 17], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7] * 23]


@pytest.fixture
async def worker(tiny_llama_dir) -> AsyncIterator[tuple[worker_pb2_grpc.WorkerStub, AsyncEngine]]:
    # fp32: tokens are compared across batch compositions (bf16 is not batch-invariant)
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=4, dtype="float32",
                                      record_kv_events=True))
    server = grpc.aio.server()
    events = KVEventHub(engine, interval_s=0.01)
    worker_pb2_grpc.add_WorkerServicer_to_server(DecodeWorkerServicer(engine, "w1", "both", events), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    events.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield worker_pb2_grpc.WorkerStub(channel), engine
    await channel.close()
    await server.stop(grace=None)
    await events.stop()
    engine.shutdown()


def _request(rid: str, prompt: list[int], max_tokens: int = 8) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=pb.SamplingParameters(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True), timeout_seconds=60)


async def _collect(stub: worker_pb2_grpc.WorkerStub, request: worker_pb2.WorkerGenerateRequest) -> list:
    return [chunk async for chunk in stub.Generate(request)]


async def test_streams_equal_the_engine_alone(worker, tiny_llama_dir) -> None:
    stub, _ = worker
    chunks = await asyncio.gather(*(_collect(stub, _request(f"r{i}", p)) for i, p in enumerate(PROMPTS)))
    expected = LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=4, dtype="float32").generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for got, want in zip(chunks, expected, strict=True):
        assert [t for c in got for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in got) == want.text
        assert got[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert got[-1].usage.completion_tokens == 8 and got[-1].usage.prompt_tokens == len(want.prompt_token_ids)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in got[:-1])


@pytest.mark.parametrize(("prompt", "sampling", "needle"), [
    ([], pb.SamplingParameters(), "empty"),
    ([10**6], pb.SamplingParameters(), "vocabulary"),
    ([5, 6], pb.SamplingParameters(temperature=-1.0), "temperature"),
])
async def test_bad_requests_get_invalid_argument_and_the_worker_stays_up(worker, prompt, sampling, needle) -> None:
    stub, engine = worker
    request = worker_pb2.WorkerGenerateRequest(request_id="bad", prompt_token_ids=prompt, sampling=sampling)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await _collect(stub, request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in failure.value.details()
    assert len(await _collect(stub, _request("good", PROMPTS[0], 2))) >= 1
    assert (await engine.status()).integrity_error is None


async def test_cancelled_stream_frees_its_blocks(worker) -> None:
    stub, engine = worker
    call = stub.Generate(_request("long", PROMPTS[1], max_tokens=200))
    first = await call.read()
    assert first.token_ids
    call.cancel()
    for _ in range(100):
        status = await stub.Status(worker_pb2.StatusRequest())
        if status.running == 0 and status.waiting == 0:
            break
        await asyncio.sleep(0.05)
    assert status.running == 0 and status.free_blocks == status.total_blocks  # cached blocks count as free
    assert engine.stats().computed_tokens_total < len(PROMPTS[1]) + 150  # stopped early, not run to the end
    assert (await engine.status()).integrity_error is None
    assert not (await stub.Abort(worker_pb2.AbortRequest(request_id="long"))).found


async def test_logprobs_and_stop_reasons_travel(worker) -> None:
    stub, _ = worker
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    request = worker_pb2.WorkerGenerateRequest(request_id="lp", prompt_token_ids=PROMPTS[0], sampling=sampling)
    chunks = await _collect(stub, request)
    tokens = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens and all(len(lp.top) == 2 for lp in logprobs)
    assert all(lp.top[0].logprob >= lp.top[1].logprob and lp.logprob <= 0 for lp in logprobs)
    stop_at = tokens[2]
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=5, ignore_eos=True, stop_token_ids=[stop_at])
    request = worker_pb2.WorkerGenerateRequest(request_id="st", prompt_token_ids=PROMPTS[0], sampling=sampling)
    last = (await _collect(stub, request))[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.stop_token_id == stop_at


async def test_kv_events_report_what_the_prefix_cache_holds(worker) -> None:
    """A subscriber first gets a snapshot (`cleared`), then each block a prompt leaves cached, and
    the hashes are the ones the router computes for the same tokens."""
    stub, _ = worker
    stream = stub.KVEvents(worker_pb2.KVEventsRequest())
    first = await asyncio.wait_for(stream.read(), 10)
    assert first.cleared
    held = set(first.stored_block_hashes)
    prompt = list(range(20, 33))  # 13 tokens: 3 full blocks of 4
    await _collect(stub, _request("cached", prompt, max_tokens=1))
    expected = set(hash_blocks(prompt, 4))
    while not expected <= held:
        batch = await asyncio.wait_for(stream.read(), 10)
        held |= set(batch.stored_block_hashes)
        held -= set(batch.removed_block_hashes)
    stream.cancel()
    status = await stub.Status(worker_pb2.StatusRequest())
    assert status.pool_integrity_ok and status.free_blocks == status.total_blocks


async def test_an_idle_hub_sleeps_until_the_engine_has_changes(worker, monkeypatch) -> None:
    """Idle, the hub does not poll the engine every interval (a fleet of simulated workers holds hundreds
    of hubs); the next change wakes it and reaches the subscriber."""
    stub, engine = worker
    stream = stub.KVEvents(worker_pb2.KVEventsRequest())
    assert (await asyncio.wait_for(stream.read(), 10)).cleared
    while engine._kv_listener is None:  # the hub settles: asleep, its wake-up armed
        await asyncio.sleep(0.01)
    polls: list[int] = []
    has_kv_events = engine.has_kv_events
    monkeypatch.setattr(engine, "has_kv_events", lambda: polls.append(1) or has_kv_events())
    await asyncio.sleep(0.5)  # 50 of its 10 ms intervals
    assert len(polls) <= 1, f"an idle hub polled the engine {len(polls)} times in 0.5 s"
    prompt = list(range(60, 73))
    await _collect(stub, _request("wakes", prompt, max_tokens=1))
    held: set[int] = set()
    while not set(hash_blocks(prompt, 4)) <= held:
        held |= set((await asyncio.wait_for(stream.read(), 10)).stored_block_hashes)
    stream.cancel()


async def test_a_prefill_call_on_a_decode_worker_is_refused(worker) -> None:
    stub, _ = worker
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Prefill(worker_pb2.PrefillRequest(request_id="p", prompt_token_ids=[1, 2]))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_call_cancelled_under_the_handler_is_answered_unavailable(worker, monkeypatch) -> None:
    """A CancelledError the handler did not ask for (grpc.aio raises it from an inner call whose channel
    closed) ends the call at once with UNAVAILABLE, which the router retries elsewhere; left alone, gRPC
    never answered and the caller waited for its deadline. The worker stays up."""
    stub, engine = worker

    async def inner_call_cancelled(*args, **kwargs):
        raise asyncio.CancelledError

    with monkeypatch.context() as patch:
        patch.setattr(DecodeWorkerServicer, "_start", inner_call_cancelled)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await asyncio.wait_for(_collect(stub, _request("stray", PROMPTS[0])), 20)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "cancelled" in failure.value.details()
    assert len(await _collect(stub, _request("after", PROMPTS[0], 2))) >= 1
    assert (await engine.status()).integrity_error is None
