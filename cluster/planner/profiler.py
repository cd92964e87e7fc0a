"""`tandem profile`: measure a live cluster (through its router) or one decode / aggregated worker
(its Worker service, prefilling locally) and write the capacity profile the planner loads.

  prefill  `prefill_concurrency` clients send random prompts of `prompt_tokens` tokens for one
           token each, for `prefill_s`: prompt tokens/s, divided by `prefill_workers`
  decode   at each batch size of `decode_batches`, that many clients stream `decode_tokens`
           greedy tokens each, again and again, for `step_s`: the ITL quantiles (gap between two
           chunks per token, as the router measures it) and tokens/s, per decode worker. Stops
           rising once the ITL p90 passes `max_itl_s` or the time budget runs out.

Random prompts of ids below `max_token_id` defeat the prefix cache. Plaintext gRPC only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import random
import time
import uuid

import grpc

from cluster.planner.capacity import CapacityProfile, DecodePoint
from cluster.planner.settings import ProfileSettings
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
QUANTILES = (0.5, 0.9, 0.99)


class _Client:
    """One streaming greedy request at a time per call; the chunks' arrival times and token counts."""

    def __init__(self, settings: ProfileSettings) -> None:
        self.settings = settings
        self.channel = grpc.aio.insecure_channel(settings.address)
        self.metadata = (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else None

    async def stream(self, ids: list[int], max_tokens: int, timeout_s: float) -> list[tuple[float, int]]:
        sampling = pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        if self.settings.via == "router":
            call = inference_pb2_grpc.InferenceStub(self.channel).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling, timeout_seconds=timeout_s),
                timeout=timeout_s, metadata=self.metadata)
        else:
            call = worker_pb2_grpc.WorkerStub(self.channel).Generate(worker_pb2.WorkerGenerateRequest(
                request_id=uuid.uuid4().hex, prompt_token_ids=ids, sampling=sampling, timeout_seconds=timeout_s),
                timeout=timeout_s)
        return [(time.monotonic(), len(chunk.token_ids)) async for chunk in call if chunk.token_ids]


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


async def _clients(count: int, duration_s: float, request: object) -> None:
    """`count` loops of `await request()` for `duration_s`; requests still running then are cancelled."""
    end = time.monotonic() + duration_s

    async def loop() -> None:
        while time.monotonic() < end:
            await request()  # type: ignore[operator]
    tasks = [asyncio.create_task(loop()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=duration_s)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for task in done:
        task.result()  # a failed request fails the profile


async def _prefill(client: _Client, s: ProfileSettings, rng: random.Random) -> float:
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        await client.stream([rng.randrange(4, s.max_token_id) for _ in range(s.prompt_tokens)], 1, s.prefill_s + 30)
        tokens += s.prompt_tokens
    started = time.monotonic()
    await _clients(s.prefill_concurrency, s.prefill_s, one)
    return tokens / (time.monotonic() - started) / s.prefill_workers


async def _decode_step(client: _Client, s: ProfileSettings, batch: int, rng: random.Random) -> DecodePoint:
    gaps: list[float] = []
    measure_from = time.monotonic() + s.step_s * 0.2  # the batch fills first
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        chunks = await client.stream([rng.randrange(4, s.max_token_id) for _ in range(s.decode_prompt_tokens)],
                                     s.decode_tokens, s.step_s + 30)
        for (before, _), (at, count) in itertools.pairwise(chunks):
            if before >= measure_from:
                gaps.append((at - before) / count)  # one sample per chunk, as the router's ITL
                tokens += count
    await _clients(batch, s.step_s, one)
    span = time.monotonic() - measure_from
    if not gaps:
        raise RuntimeError(f"batch {batch}: no request finished within {s.step_s} s; raise --step-s")
    gaps.sort()
    return DecodePoint(batch / s.decode_workers, {str(q): quantile(gaps, q) for q in QUANTILES},
                       tokens / span / s.decode_workers)


async def measure(s: ProfileSettings) -> CapacityProfile:
    rng = random.Random(0)
    client = _Client(s)
    deadline = time.monotonic() + s.time_budget_s
    try:
        prefill = await _prefill(client, s, rng) if s.prefill_s > 0 else None
        if prefill is not None:
            log.info("prefill: %.0f prompt tokens/s per worker", prefill)
        points: list[DecodePoint] = []
        for batch in s.batches:
            if time.monotonic() + s.step_s > deadline:
                log.warning("time budget spent: decode profiled up to batch %s", points[-1].batch if points else 0)
                break
            point = await _decode_step(client, s, batch, rng)
            points.append(point)
            log.info("decode batch %g: ITL p50 %.4fs p90 %.4fs, %.0f tokens/s per worker", point.batch,
                     point.itl_at(0.5), point.itl_at(0.9), point.tokens_per_s)
            if point.itl_at(0.9) > s.max_itl_s:
                break
    finally:
        await client.channel.close()
    meta = {"via": s.via, "address": s.address, "prompt_tokens": str(s.prompt_tokens),
            "decode_tokens": str(s.decode_tokens),
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    return CapacityProfile(prefill, tuple(points), meta)


def run(settings: ProfileSettings) -> int:
    profile = asyncio.run(measure(settings))
    profile.save(settings.output)
    print(f"capacity profile written to {settings.output}", flush=True)
    return 0
