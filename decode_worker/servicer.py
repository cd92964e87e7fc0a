"""The Worker service of a decode worker (role "decode": prefills remotely when it pays, see
remote_prefill.py) or of an aggregated one (role "both": always prefills locally)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from decode_worker.remote_prefill import DisaggregationPolicy, PrefillDecision, RemotePrefiller
from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2
from worker_runtime.convert import response_from_output, sampling_from_proto
from worker_runtime.kv_events import KVEventHub
from worker_runtime.kv_store_client import KVStoreClient
from worker_runtime.metrics import DISAGGREGATION, GENERATED_TOKENS, PREFILL_TOKENS, WORKER_REQUESTS
from worker_runtime.servicer_base import WorkerServicerBase

log = logging.getLogger(__name__)


class DecodeWorkerServicer(WorkerServicerBase):
    def __init__(self, engine: AsyncEngine, worker_id: str, role: str, events: KVEventHub,
                 remote: RemotePrefiller | None = None, policy: DisaggregationPolicy | None = None,
                 max_admitted: int | None = None, store: KVStoreClient | None = None) -> None:
        """`store`: the cluster KV store's client; a prompt prefilled here reads the blocks it holds first."""
        super().__init__(engine, worker_id, role, events, max_admitted)
        self.remote = remote
        self.store = store
        self.policy = policy or DisaggregationPolicy(0)
        self._handlers: dict[str, asyncio.Task] = {}  # request id → the Generate call serving it

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        async with self.admission(context, "Generate"):
            task = asyncio.current_task()
            if task is not None and request.request_id not in self._handlers:
                self._handlers[request.request_id] = task
                try:
                    async for chunk in self._generate(request, context):
                        yield chunk
                finally:
                    del self._handlers[request.request_id]
            else:  # a duplicate id: the engine refuses it with INVALID_ARGUMENT
                async for chunk in self._generate(request, context):
                    yield chunk

    async def Abort(self, request: worker_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        """Cancelling the Generate call runs its own clean-up, which is the safe one: blocks a
        prefill worker may still be writing stay held until it confirms (remote_prefill.py)."""
        task = self._handlers.get(request.request_id)
        if task is None:
            return await super().Abort(request, context)
        task.cancel()
        await asyncio.wait({task}, timeout=10)
        return worker_pb2.AbortResponse(found=True)

    async def _generate(self, request: worker_pb2.WorkerGenerateRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        timeout = request.timeout_seconds or None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            engine_request = self.engine.make_request(
                request.request_id, list(request.prompt_token_ids), sampling_from_proto(request.sampling),
                request.priority, list(request.resume_token_ids), request.cache_salt)
            async with asyncio.timeout(timeout):
                decision, stream = await self._start(request, engine_request, deadline)
        except ValueError as e:  # InvalidRequestError included: the worker stays up
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except TimeoutError:
            await self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"request {request.request_id!r} ran past its {timeout} s deadline before prefill")
        DISAGGREGATION.labels(self.worker_id, decision).inc()
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                first = True
                async for out in stream:  # leaving early (cancel, deadline) aborts the request in the engine
                    if first and decision != "remote":
                        self._count_local_prefill(out)
                    first = False
                    GENERATED_TOKENS.labels(self.worker_id).inc(len(out.new_token_ids))
                    yield response_from_output(out)
        except TimeoutError:
            await self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"request {request.request_id!r} ran past its {timeout} s deadline")
        except InvalidRequestError as e:  # refused after queueing it (e.g. a resume it cannot replay)
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:  # the engine died mid-stream (a tensor-parallel rank lost): the router migrates
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, str(e))
        WORKER_REQUESTS.labels(self.worker_id, "Generate", "ok").inc()

    async def _start(self, request: worker_pb2.WorkerGenerateRequest, engine_request: EngineRequest,
                     deadline: float | None) -> tuple[PrefillDecision, AsyncIterator[RequestOutput]]:
        if engine_request.resume_token_ids:  # migrated: prompt + streamed tokens are recomputed here, none sent again
            return "local_resume", await self.engine.add_request(engine_request)
        decision: PrefillDecision = "local_no_prefill_worker"
        if self.remote is not None:
            prompt = engine_request.prompt_token_ids
            has_targets = len(request.prefill) > 0
            # a request for prompt logprobs computes its whole prompt: the cache does not shorten it
            reads_cache = has_targets and engine_request.params.prompt_logprobs is None
            cached = await self.engine.remote_kv.cached_prefix_tokens(prompt, request.cache_salt) if reads_cache else 0
            decision = self.policy.decide(len(prompt), cached, has_targets)
            if decision == "remote":
                return await self.remote.start(request, engine_request, deadline)
        if self.store is not None and engine_request.params.prompt_logprobs is None:
            await self.store.fetch(engine_request.prompt_token_ids, request.cache_salt)
        return decision, await self.engine.add_request(engine_request)

    def _count_local_prefill(self, out: RequestOutput) -> None:
        PREFILL_TOKENS.labels(self.worker_id, "cached").inc(out.num_cached_tokens)
        PREFILL_TOKENS.labels(self.worker_id, "computed").inc(len(out.prompt_token_ids) - out.num_cached_tokens)

    async def _fail(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        WORKER_REQUESTS.labels(self.worker_id, "Generate", code.name.lower()).inc()
        await context.abort(code, message)
