"""The Worker service of a decode worker (role "decode": prefills remotely when it pays, see
remote_prefill.py) or of an aggregated one (role "both": always prefills locally)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from cluster.convert import response_from_output, sampling_from_proto
from cluster.kv_events import KVEventHub
from cluster.worker_base import WorkerServicerBase
from cluster.worker_metrics import DISAGGREGATION, GENERATED_TOKENS, PREFILL_TOKENS, WORKER_REQUESTS
from decode_worker.remote_prefill import Decision, DisaggregationPolicy, RemotePrefiller
from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)


class DecodeWorkerServicer(WorkerServicerBase):
    def __init__(self, engine: AsyncEngine, worker_id: str, role: str, events: KVEventHub,
                 remote: RemotePrefiller | None = None, policy: DisaggregationPolicy | None = None,
                 max_admitted: int | None = None) -> None:
        super().__init__(engine, worker_id, role, events, max_admitted)
        self.remote = remote
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
            params = sampling_from_proto(request.sampling)
            self.engine.engine._validate_prompt(list(request.prompt_token_ids))
            async with asyncio.timeout(timeout):
                decision, stream = await self._start(request, params, deadline)
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
        WORKER_REQUESTS.labels(self.worker_id, "Generate", "ok").inc()

    async def _start(self, request: worker_pb2.WorkerGenerateRequest, params: SamplingParams,
                     deadline: float | None) -> tuple[Decision, AsyncIterator[RequestOutput]]:
        prompt = list(request.prompt_token_ids)
        if request.resume_token_ids:  # migrated: prompt + streamed tokens are recomputed here, none is sent again
            return "local_resume", await self.engine.add_request(request.request_id, prompt, params, request.priority,
                                                                 list(request.resume_token_ids))
        if self.remote is not None:
            has_targets = len(request.prefill) > 0
            cached = await self.remote.cached_prompt_tokens(prompt) if has_targets else 0
            decision = self.policy.decide(len(prompt), cached, has_targets)
            if decision == "remote":
                return await self.remote.start(request, params, deadline)
        else:
            decision = "local_no_prefill_worker"
        return decision, await self.engine.add_request(request.request_id, prompt, params, request.priority)

    def _count_local_prefill(self, out: RequestOutput) -> None:
        PREFILL_TOKENS.labels(self.worker_id, "cached").inc(out.num_cached_tokens)
        PREFILL_TOKENS.labels(self.worker_id, "computed").inc(len(out.prompt_token_ids) - out.num_cached_tokens)

    async def _fail(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        WORKER_REQUESTS.labels(self.worker_id, "Generate", code.name.lower()).inc()
        await context.abort(code, message)
