"""Bad input, overload, no workers and cancellation, at the router of a running 1P+1D cluster:
the right gRPC status / HTTP status with a message, nothing leaked, every worker still up. The
cancellation test runs on real and on simulated engines (engine.simulated): the workers' part of it
(abort, free the blocks) is the same code on both."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import openai
import pytest

from bench.scrape import router_metrics
from common.processes import spawn
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import REPO, Cluster, assert_pools_clean, metric, tandem_up, worker_metrics, worker_status
from tests.support.simulation import SLOW_DECODE, Engines, expected_of, write_profile

pytestmark = pytest.mark.slow

ONE_BY_ONE = ("--prefill", "1", "--decode", "1", "--num-kv-blocks", "128", "--min-remote-prefill-tokens", "4")


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    with tandem_up(*ONE_BY_ONE, *Engines(tiny_llama_dir).args) as running:
        yield running


@pytest.fixture(params=["real", "simulated"])
def cluster_and_engines(request: pytest.FixtureRequest, tiny_llama_dir: pathlib.Path,
                        tmp_path: pathlib.Path) -> Iterator[tuple[Cluster, Engines]]:
    """The module's cluster, or a like one of simulated engines decoding at ~10 steps/s (a 210-token
    stream takes 20 s: a cancelled one is caught mid-way, as on the real tiny model)."""
    if request.param == "real":
        yield request.getfixturevalue("cluster"), Engines(tiny_llama_dir)
        return
    engines = Engines(tiny_llama_dir, write_profile(tmp_path, tiny_llama_dir, decode=SLOW_DECODE))
    with tandem_up(*ONE_BY_ONE, *engines.args) as running:
        yield running, engines


@contextmanager
def extra_router(cluster: Cluster, model: str, *args: str) -> Iterator[tuple[str, str]]:
    """Another router process on the cluster's etcd: (gRPC address, HTTP url)."""
    proc = spawn([sys.executable, "-m", "cluster.cli", "router", "--etcd", cluster.etcd, "--model", model,
                  "--grpc-port", "0", "--http-port", "0", *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        _, _, address, url = proc.stdout.readline().split()
        yield address, url
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]


def _request(**fields) -> pb.GenerateRequest:  # type: ignore[no-untyped-def]
    sampling = fields.pop("sampling", pb.SamplingParameters(temperature=0.0, max_tokens=4))
    return pb.GenerateRequest(sampling=sampling, **fields)


async def _call(address: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        return [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)]


async def _assert_router_idle(cluster: Cluster, timeout_s: float = 10.0) -> None:
    """The router's gauges of requests in flight and streams decoding return to 0 (the planner reads the
    latter as the decode pool's load: a stream ended any way must leave it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = router_metrics(cluster)
        gauges = (metric(text, "tandem_router_inflight_requests"), metric(text, "tandem_router_decoding_streams"))
        if gauges == (0, 0):
            return
        assert time.monotonic() < deadline, f"in flight, decoding at the router: {gauges}"
        await asyncio.sleep(0.1)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


BAD_GRPC = [
    (_request(), grpc.StatusCode.INVALID_ARGUMENT, "no input"),
    (_request(text=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (_request(token_ids=pb.TokenIds(ids=[5, 10**6])), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (_request(token_ids=pb.TokenIds(ids=[5] * 300)), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    (_request(text="hi", sampling=pb.SamplingParameters(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (_request(text="hi", timeout_seconds=-1), grpc.StatusCode.INVALID_ARGUMENT, "timeout"),
    (_request(text="hi", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "gpt-9"),
    (_request(chat=pb.ChatInput()), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
]


@pytest.mark.parametrize(("request_", "code", "needle"), BAD_GRPC)
async def test_bad_grpc_requests(cluster: Cluster, request_: pb.GenerateRequest, code: grpc.StatusCode,
                                 needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await _call(cluster.grpc_address, request_)
    assert failure.value.code() == code and needle in failure.value.details()


BAD_HTTP = [
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", b'{"prompt": "hi", "n": 65}', 400, "'n'"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": [5, 1000000]}', 400, "vocabulary"),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-9"}', 404, "gpt-9"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_HTTP)
def test_bad_http_requests(cluster: Cluster, path: str, body: bytes, status: int, needle: str) -> None:
    code, reply = _post(cluster.http_url + path, body)
    assert code == status and needle in reply["error"]["message"], reply


async def test_openai_client_sees_the_statuses(cluster: Cluster) -> None:
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="", prompt="hi", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    await client.close()


async def test_cancelled_streams_free_every_block(cluster_and_engines: tuple[Cluster, Engines]) -> None:
    """A gRPC client cancelling mid-stream and an HTTP client hanging up mid-SSE: each request is
    aborted on the workers (it stops well short of its 210 tokens) and the pools return to free/cached."""
    cluster, engines = cluster_and_engines
    decode = cluster.role("decode")[0]

    def generated() -> float:
        return metric(worker_metrics(decode), "tandem_generation_tokens_total")

    long = pb.SamplingParameters(temperature=0.0, max_tokens=210, ignore_eos=True)
    before = generated()
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            _request(token_ids=pb.TokenIds(ids=list(range(10, 50))), sampling=long))
        first = list((await call.read()).token_ids)
        assert first
        if engines.profile is not None:  # the simulated model's stream, exactly
            assert first == expected_of(engines.checkpoint, list(range(10, 50)), len(first))
        call.cancel()
    await assert_pools_clean(cluster)
    await _assert_router_idle(cluster)
    by_grpc = generated() - before
    assert 0 < by_grpc < 210 * 0.75, f"{by_grpc} tokens: the cancelled gRPC request ran on"

    before = generated()
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
    stream = await client.completions.create(model="", prompt=list(range(60, 100)), max_tokens=210, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for event in stream:
        assert event.choices[0].text is not None
        break
    await stream.close()
    await client.close()
    await assert_pools_clean(cluster)
    await _assert_router_idle(cluster)
    by_http = generated() - before
    assert 0 < by_http < 210 * 0.75, f"{by_http} tokens: the cancelled HTTP request ran on"


async def test_overload_and_no_workers(cluster: Cluster, tiny_llama_dir) -> None:
    """A router at its in-flight limit answers RESOURCE_EXHAUSTED / 429; one whose cluster has no
    worker answers UNAVAILABLE / 503 (and /health 503)."""
    with extra_router(cluster, str(tiny_llama_dir), "--max-inflight", "1") as (address, url):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            busy = stub.Generate(_request(text="keep me busy", sampling=pb.SamplingParameters(
                temperature=0.0, max_tokens=200, ignore_eos=True)))
            assert (await busy.read()).token_ids
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await _call(address, _request(text="one more"))
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in failure.value.details()
            code, reply = _post(url + "/v1/completions", b'{"prompt": "one more"}')
            assert code == 429 and "limit" in reply["error"]["message"]
            busy.cancel()
    with extra_router(cluster, str(tiny_llama_dir), "--cluster", "nobody-here") as (address, url):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await _call(address, _request(text="hello"))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "worker" in failure.value.details()
        code, reply = _post(url + "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}')
        assert code == 503 and "worker" in reply["error"]["message"]
        try:
            urllib.request.urlopen(url + "/health", timeout=10)
            raise AssertionError("/health answered 200 without workers")
        except urllib.error.HTTPError as e:
            assert e.code == 503


async def test_workers_are_still_up_and_serving(cluster: Cluster) -> None:
    for worker in cluster.workers:
        status = await worker_status(worker)
        assert status.pool_integrity_ok, status.integrity_error
    chunks = await _call(cluster.grpc_address, _request(token_ids=pb.TokenIds(ids=list(range(5, 40)))))
    assert sum(len(c.token_ids) for c in chunks) == 4
    await assert_pools_clean(cluster)
