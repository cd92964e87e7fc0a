"""What every worker's gRPC service answers whatever its role: Abort, Status, KVEvents. A role
answers FAILED_PRECONDITION to the calls of another role. Admission: a worker takes at most
`max_admitted` Generate / Prefill calls at once (running or queued in its engine) and refuses the
next at once with RESOURCE_EXHAUSTED, so its queue, and the latency of what it accepted, stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from common.wire import QUEUE_FULL
from engine.async_engine import AsyncEngine
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2, worker_pb2_grpc
from worker_runtime.kv_events import KVEventHub
from worker_runtime.metrics import WORKER_REQUESTS

log = logging.getLogger(__name__)


class WorkerServicerBase(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, worker_id: str, role: str, events: KVEventHub,
                 max_admitted: int | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.role = role
        self.events = events
        self.max_admitted = max_admitted  # None: no limit
        self.admitted = 0  # Generate / Prefill calls between admission and their end

    @contextlib.asynccontextmanager
    async def admission(self, context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
        """Hold one admission slot for the body, or abort the call with RESOURCE_EXHAUSTED."""
        if self.max_admitted is not None and self.admitted >= self.max_admitted:
            WORKER_REQUESTS.labels(self.worker_id, rpc, "resource_exhausted").inc()
            context.set_trailing_metadata(((QUEUE_FULL, "1"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker {self.worker_id} has {self.admitted} requests admitted "
                                f"(limit {self.max_admitted}): retry later or elsewhere")
        self.admitted += 1
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the call itself was cancelled: gRPC answers it
                raise
            # a call this one awaited was cancelled under it (e.g. its channel closed): left to gRPC, the
            # caller would wait for an answer until its deadline
            log.exception("%s on worker %s: an inner call was cancelled", rpc, self.worker_id)
            WORKER_REQUESTS.labels(self.worker_id, rpc, "unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"worker {self.worker_id}: a call the {rpc} depended on was cancelled: retry")
        finally:
            self.admitted -= 1

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"a {self.role} worker does not serve Generate")
        yield pb.GenerateResponse()  # pragma: no cover (abort raises)

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"a {self.role} worker does not serve Prefill")
        raise AssertionError("unreachable")

    async def Abort(self, request: worker_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        """Returns once the engine has dropped the request (no step is using its blocks any more)."""
        return worker_pb2.AbortResponse(found=await self.engine.abort(request.request_id))

    async def Status(self, request: worker_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStatus:
        status = await self.engine.status()
        stats = status.stats
        return worker_pb2.WorkerStatus(
            worker_id=self.worker_id, role=self.role, running=stats.running,
            waiting=stats.waiting + stats.waiting_for_remote_kv, free_blocks=stats.free_blocks,
            total_blocks=stats.total_blocks, pool_integrity_ok=status.integrity_error is None,
            integrity_error=status.integrity_error or "")

    async def KVEvents(self, request: worker_pb2.KVEventsRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.KVEventBatch]:
        async for batch in self.events.subscribe():
            yield batch
