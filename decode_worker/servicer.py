"""The Worker gRPC service of a decode (or aggregated, role "both") worker, around an AsyncEngine.

Implemented: Generate with local prefill, Abort, Status. Remote prefill (the `prefill` targets
of a request), Prefill and KVEvents are the next step of the disaggregated flow and answer
UNIMPLEMENTED (the generated base class) until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from cluster.convert import response_from_output, sampling_from_proto
from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class DecodeWorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, worker_id: str, role: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.role = role

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if request.prefill:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "remote prefill is not implemented yet")
        try:
            params = sampling_from_proto(request.sampling)
            stream = await self.engine.add_request(request.request_id, list(request.prompt_token_ids), params,
                                                   request.priority)
        except ValueError as e:  # InvalidRequestError included: the worker stays up
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        timeout = request.timeout_seconds or None
        try:
            async with asyncio.timeout(timeout):
                async for out in stream:  # leaving early (cancel, deadline) aborts the request in the engine
                    yield response_from_output(out)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {request.request_id!r} ran past its {timeout} s deadline")

    async def Abort(self, request: worker_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        found = request.request_id in self.engine.engine.requests
        await self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    async def Status(self, request: worker_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStatus:
        engine = self.engine.engine  # read from another thread: counts may be one step stale
        return worker_pb2.WorkerStatus(
            worker_id=self.worker_id, role=self.role, running=len(engine.scheduler.running),
            waiting=len(engine.scheduler.waiting), free_blocks=engine.block_manager.num_free_blocks,
            total_blocks=engine.block_manager.num_blocks)
