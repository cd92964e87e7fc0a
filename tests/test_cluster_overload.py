"""Overload: bounded queues at the router (--max-inflight) and at each worker (--max-num-seqs +
--max-queued-requests) answer RESOURCE_EXHAUSTED / 429 with a retry-after instead of letting latency
grow without bound; a soak at twice the measured capacity ends every request in success or that clear
refusal, with flat process memory and no leaked block. The refusal test runs on real and on simulated
engines (engine.simulated); the soak on real ones only (its 45 s are the suite's budget for it)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import pytest

from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import Cluster, assert_pools_clean, tandem_up, worker_status
from tests.support.simulation import SLOW_DECODE, Engines, expected_of, write_profile

LONG = pb.SamplingParameters(temperature=0.0, max_tokens=4000, ignore_eos=True)  # minutes: cancelled


def _request(seed: int, sampling: pb.SamplingParameters, timeout_s: int = 60) -> pb.GenerateRequest:
    """24 random token ids (valid in the tiny and the default model's vocabulary)."""
    rng = random.Random(seed)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[rng.randrange(5, 500) for _ in range(24)]),
                              sampling=sampling, timeout_seconds=timeout_s)


@dataclass(frozen=True)
class SlowEngines:
    """Workers whose long streams outlast the refusal test: `long` runs for many seconds on them."""
    args: tuple[str, ...]  # `tandem up` flags
    long: pb.SamplingParameters
    checkpoint: pathlib.Path | None  # set for simulated engines: their streams are checked exactly


@pytest.fixture(params=["real", "simulated"])
def slow_engines(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> SlowEngines:
    """The default model (its decode steps are slow on a CPU), or the tiny Llama simulated at ~10 decode
    steps/s: 200 tokens (its context is 256) take 20 s."""
    if request.param == "real":
        return SlowEngines((), LONG, None)
    tiny: pathlib.Path = request.getfixturevalue("tiny_llama_dir")
    profile = write_profile(tmp_path, tiny, decode=SLOW_DECODE)
    return SlowEngines(Engines(tiny, profile).args,
                       pb.SamplingParameters(temperature=0.0, max_tokens=200, ignore_eos=True), tiny)


def _post(url: str, body: dict) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.mark.slow
async def test_a_full_worker_refuses_with_retry_after(slow_engines: SlowEngines) -> None:
    """One aggregated worker admits 2 running + 1 queued; the 4th request is refused at once
    (the router has no other decode worker to try) and nothing admitted is disturbed. Slow engines:
    the admitted requests are still running."""
    long = slow_engines.long
    with tandem_up("--prefill", "0", "--decode", "0", "--both", "1", *slow_engines.args, "--max-num-seqs", "2",
                   "--max-queued-requests", "1") as cluster:
        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            busy = []
            for i in range(3):  # one at a time: the first two are running before the third arrives
                busy.append(stub.Generate(_request(i, long, timeout_s=600)))
                if i < 2:
                    first = list((await busy[i].read()).token_ids)
                    assert first
                    if slow_engines.checkpoint is not None:  # the simulated model's stream, exactly
                        assert first == expected_of(slow_engines.checkpoint, list(_request(i, long).token_ids.ids),
                                                    len(first))
            deadline = time.monotonic() + 30
            while (await worker_status(cluster.workers[0])).waiting != 1:  # the third is queued
                assert time.monotonic() < deadline, "the third request was never queued"
                await asyncio.sleep(0.05)
            refused = stub.Generate(_request(9, long, timeout_s=600))
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await refused.read()
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in failure.value.details() and "limit 3" in failure.value.details()
            assert ("retry-after", "1") in tuple(failure.value.trailing_metadata() or ())
            code, headers, reply = _post(cluster.http_url + "/v1/completions", {"prompt": "one more"})
            assert code == 429 and headers.get("Retry-After") == "1" and "busy" in reply["error"]["message"]
            for call in busy:
                call.cancel()
        await assert_pools_clean(cluster)
        last = _request(1, pb.SamplingParameters(temperature=0.0, max_tokens=4, ignore_eos=True))
        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:  # still serving
            chunks = [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(last)]
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == 4
        if slow_engines.checkpoint is not None:
            assert tokens == expected_of(slow_engines.checkpoint, list(last.token_ids.ids), 4)


SHORT = pb.SamplingParameters(temperature=0.0, max_tokens=24, ignore_eos=True)
OUTCOMES_ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


async def _one(stub: inference_pb2_grpc.InferenceStub, seed: int) -> tuple[grpc.StatusCode, float, str]:
    started = time.monotonic()
    try:
        tokens = sum([len(c.token_ids) async for c in stub.Generate(_request(seed, SHORT), timeout=60)], 0)
        assert tokens == SHORT.max_tokens
        return grpc.StatusCode.OK, time.monotonic() - started, ""
    except grpc.aio.AioRpcError as e:
        return e.code(), time.monotonic() - started, e.details() or ""


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _memory(cluster: Cluster) -> dict[int, float]:
    return {pid: _rss_mib(pid) for pid in [cluster.router_pid, *(w.pid for w in cluster.workers)]}


@pytest.mark.slow
async def test_soak_at_twice_capacity(tiny_llama_dir) -> None:
    with tandem_up("--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--min-remote-prefill-tokens", "4", "--max-num-seqs", "4", "--max-queued-requests", "4",
                   "--max-inflight", "12", "--num-kv-blocks", "256") as cluster:
        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            # capacity: a closed loop keeping a full batch busy for a few seconds (also the warm-up)
            started, done, seed = time.monotonic(), 0, 0
            while time.monotonic() - started < 6:
                results = await asyncio.gather(*[_one(stub, seed + i) for i in range(4)])
                assert all(code == grpc.StatusCode.OK for code, _, _ in results), results
                done, seed = done + 4, seed + 4
            capacity = done / (time.monotonic() - started)
            before = _memory(cluster)
            # open loop at twice that, Poisson arrivals, for a bounded time
            rng = random.Random(7)
            tasks: list[asyncio.Task] = []  # type: ignore[type-arg]
            soak_end = time.monotonic() + 20
            while time.monotonic() < soak_end:
                tasks.append(asyncio.create_task(_one(stub, 10_000 + len(tasks))))
                await asyncio.sleep(rng.expovariate(2 * capacity))
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        after = _memory(cluster)
        codes = [code for code, _, _ in results]
        assert set(codes) <= OUTCOMES_ALLOWED, [r for r in results if r[0] not in OUTCOMES_ALLOWED][:3]
        refused = [d for code, _, d in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert all("retry later" in d or "busy" in d for d in refused), refused[:3]
        ok = [t for code, t, _ in results if code == grpc.StatusCode.OK]
        print(f"soak: capacity {capacity:.1f} req/s, offered {len(results)} at 2x: {len(ok)} ok, "
              f"{len(refused)} refused; RSS MiB before {before} after {after}")
        assert len(ok) >= len(results) / 4, f"{len(ok)} of {len(results)} succeeded at 2x capacity {capacity:.1f}/s"
        # bounded queues bound latency: the last third of the soak is no slower than the first
        third = len(ok) // 3
        first, last = statistics.median(ok[:third]), statistics.median(ok[-third:])
        assert last < 2 * first + 0.5, f"latency grew from {first:.2f} s to {last:.2f} s"
        for pid, mib in after.items():
            assert mib < before[pid] * 1.15 + 30, f"pid {pid}: RSS {before[pid]:.0f} → {mib:.0f} MiB"
        await assert_pools_clean(cluster)
