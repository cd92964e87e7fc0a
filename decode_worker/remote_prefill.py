"""Decode side of a disaggregated prefill: reserve blocks, ask a prefill worker to fill them, wait
until every page has landed, then let the request join the batch.

Invariants:
- A reserved block is never reused while a prefill worker may still write into it: after a failed,
  late or cancelled attempt its blocks are detached (still held, engine.remote_kv) and freed only
  once that worker confirmed the abort, or its transfer link is gone, or `quarantine_s` has passed.
- Every attempt that fails falls through to the next prefill target, then to a local prefill; a
  request never ends because a prefill worker did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import grpc

from common.tls import open_channel
from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError, OutOfKVBlocksError, RankCommandError
from engine.outputs import RequestOutput
from engine.remote_kv import RemotePrefillResult
from engine.request import EngineRequest
from kv_transfer import TransferError
from kv_transfer.kv_connector import KVConnector, rank_name
from tandem.v1 import worker_pb2, worker_pb2_grpc
from worker_runtime.convert import logprob_from_proto
from worker_runtime.metrics import REMOTE_PREFILL_FAILURES, REMOTE_PREFILL_SECONDS
from worker_runtime.transfer import kv_segment_name

log = logging.getLogger(__name__)

# local_resume: a migrated request (resume_token_ids) recomputes prompt + streamed tokens here
PrefillDecision = Literal["remote", "local_short", "local_cached", "local_no_prefill_worker", "local_no_blocks",
                          "fallback", "local_resume"]


@dataclass(frozen=True)
class DisaggregationPolicy:
    """Prefill remotely only when it saves this worker real work: at least `min_remote_prefill_tokens`
    prompt tokens that its own prefix cache does not already hold."""

    min_remote_prefill_tokens: int

    def decide(self, num_prompt_tokens: int, num_cached_tokens: int, has_targets: bool) -> PrefillDecision:
        if not has_targets:
            return "local_no_prefill_worker"
        if num_prompt_tokens < self.min_remote_prefill_tokens:
            return "local_short"
        if num_prompt_tokens - num_cached_tokens < self.min_remote_prefill_tokens:
            return "local_cached"
        return "remote"


class RemotePrefillFailed(Exception):
    pass


class RemotePrefiller:
    def __init__(self, engine: AsyncEngine, connector: KVConnector, worker_id: str, timeout_s: float,
                 quarantine_s: float = 60.0, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.engine = engine
        self.remote_kv = engine.remote_kv
        self.connector = connector
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.quarantine_s = quarantine_s
        self._credentials = credentials  # cluster TLS: prefill workers take only mutual-TLS calls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._prefill_ranks: dict[str, int] = {}  # a prefill worker's tensor-parallel degree (its published layout)

    async def start(self, request: worker_pb2.WorkerGenerateRequest, engine_request: EngineRequest,
                    deadline: float | None) -> tuple[PrefillDecision, AsyncIterator[RequestOutput]]:
        """Prefill `request` (validated as `engine_request`) on its targets in turn, else here; returns
        the decision and the stream. Attempt i runs under the id "<request id>#i" on the prefill
        worker and in the KV notes, so a late note of an abandoned attempt never counts for the next."""
        rid = request.request_id
        attempt, clean_up = 0, True
        try:
            try:
                blocks, stream = await self.remote_kv.reserve(engine_request)
            except OutOfKVBlocksError:  # the scheduler queues it until blocks free up
                return "local_no_blocks", await self.engine.add_request(engine_request)
            except ValueError:  # InvalidRequestError (e.g. the id is in use by another request): nothing reserved
                clean_up = False
                raise
            for attempt, target in enumerate(request.prefill):
                if attempt > 0:
                    try:
                        blocks = await self.remote_kv.rereserve(rid)
                    except OutOfKVBlocksError:  # the failed attempts still hold theirs: wait in the queue
                        break
                try:
                    await self._prefill_on(target, request, blocks, deadline, f"{rid}#{attempt}")
                    return "remote", stream
                except RemotePrefillFailed as e:
                    log.warning("remote prefill of %s on %s failed: %s", rid, target.prefill_address, e)
                    await self._give_up(rid, f"{rid}#{attempt}", target)
            await self.remote_kv.prefill_locally(rid)
            return "fallback", stream
        except BaseException:  # cancelled, or this engine failed: free everything, safely
            if clean_up:
                target = request.prefill[attempt] if request.prefill else None
                self._spawn(self._cancel(rid, f"{rid}#{attempt}", target))
            raise

    async def _prefill_on(self, target: worker_pb2.PrefillTarget, request: worker_pb2.WorkerGenerateRequest,
                          blocks: list[int], deadline: float | None, attempt_id: str) -> None:
        try:  # a prefill worker with other weights (or layout) gets no page, whatever its own check did
            layout = await self.connector.check_peer(kv_segment_name(target.prefill_engine_id))
            self._prefill_ranks[target.prefill_engine_id] = layout.tp_size
        except TransferError as e:
            raise self._failed(type(e).__name__, f"{type(e).__name__}: {e}") from e
        timeout = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
        if timeout <= 0:
            raise RemotePrefillFailed("no time left before the request's deadline")
        started = time.monotonic()
        try:  # (between tensor-parallel groups: every route's sender granted the rank it writes)
            receipt = await self.connector.expect_routes(attempt_id, target.prefill_engine_id, blocks, layout)
        except (TransferError, RankCommandError, EngineDeadError) as e:
            raise self._failed(type(e).__name__, f"{type(e).__name__}: {e}") from e
        try:
            stub = worker_pb2_grpc.WorkerStub(self._channel(target.prefill_address))
            response = await stub.Prefill(worker_pb2.PrefillRequest(
                request_id=attempt_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                decode_segment=self.connector.segment_name, decode_block_ids=blocks, timeout_seconds=timeout,
                cache_salt=request.cache_salt),
                timeout=timeout)
            answered = time.monotonic()
            first = await receipt.wait(max(timeout - (answered - started), 0.5))
            REMOTE_PREFILL_SECONDS.labels(self.worker_id, "rpc").observe(answered - started)
            REMOTE_PREFILL_SECONDS.labels(self.worker_id, "kv_tail").observe(time.monotonic() - answered)
        except grpc.aio.AioRpcError as e:
            raise self._failed(e.code().name.lower(), f"{e.code().name}: {e.details()}") from e
        except TransferError as e:
            raise self._failed(type(e).__name__, f"{type(e).__name__}: {e}") from e
        finally:
            receipt.close()
        if first != response.first_token_id:
            raise self._failed("first_token_mismatch",
                               f"the reply says first token {response.first_token_id}, the KV note {first}")
        logprob = logprob_from_proto(response.first_logprob) if response.HasField("first_logprob") else None
        try:
            await self.remote_kv.resume(request.request_id, RemotePrefillResult(
                first, logprob, response.num_cached_tokens,
                tuple(logprob_from_proto(lp) for lp in response.prompt_logprobs)))
        except ValueError as e:  # e.g. a first token outside the vocabulary: the prefill worker's fault
            raise self._failed("bad_result", str(e)) from e

    def _failed(self, error: str, message: str) -> RemotePrefillFailed:
        REMOTE_PREFILL_FAILURES.labels(self.worker_id, error).inc()
        return RemotePrefillFailed(message)

    async def _give_up(self, rid: str, attempt_id: str, target: worker_pb2.PrefillTarget) -> None:
        await self.remote_kv.detach(rid, attempt_id, self.quarantine_s)
        self._spawn(self._release_when_safe(attempt_id, target))

    async def _cancel(self, rid: str, attempt_id: str, target: worker_pb2.PrefillTarget | None) -> None:
        with contextlib.suppress(Exception):  # not parked any more (finished or already detached)
            await self.remote_kv.detach(rid, attempt_id, self.quarantine_s)
        await self.engine.abort(rid)
        if target is not None:
            await self._release_when_safe(attempt_id, target)
        else:
            await self.remote_kv.release(attempt_id)

    async def _release_when_safe(self, attempt_id: str, target: worker_pb2.PrefillTarget) -> None:
        """Free detached blocks once the prefill worker confirmed it dropped the request (its Abort
        returns only then), or its transfer link is gone (a dead process writes nothing). After
        `quarantine_s` (a worker unreachable for that long is given up on) the engine frees them
        itself (engine.remote_kv), and this stops asking."""
        stub = worker_pb2_grpc.WorkerStub(self._channel(target.prefill_address))
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.quarantine_s
        while True:
            try:
                await stub.Abort(worker_pb2.AbortRequest(request_id=attempt_id), timeout=2.0)
                break
            except grpc.aio.AioRpcError as e:
                ranks = self._prefill_ranks.get(target.prefill_engine_id, 1)  # (every rank of its group may write)
                if not any(self.connector.transfer.link.is_linked(rank_name(target.prefill_engine_id, r))
                           for r in range(ranks)):
                    break
                if loop.time() >= give_up_at:
                    log.warning("prefill worker %s never confirmed the abort of %s (%s): freeing its blocks "
                                "after %.0f s", target.prefill_address, attempt_id, e.code().name, self.quarantine_s)
                    break
                await asyncio.sleep(0.5)
        await self.remote_kv.release(attempt_id)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._credentials)
        return channel

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for channel in self._channels.values():
            await channel.close()
