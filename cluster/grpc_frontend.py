"""The public gRPC service, tandem.v1.Inference, on the router."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from cluster.api_keys import ANONYMOUS, ApiKeys
from cluster.router_core import RouterCore, RouterError
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc

# refusals a client should retry after the router's retry-after (seconds, in the trailing metadata)
_RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: RouterCore, keys: ApiKeys | None = None) -> None:
        self.core = core
        self.keys = keys  # the interceptor already refused calls without a valid key

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            remaining = context.time_remaining()  # None, or huge, when the client set no deadline
            caller = None if self.keys is None else self.keys.caller(
                dict(context.invocation_metadata() or ()).get("authorization"))
            prepared = self.core.prepare(request, remaining if remaining is not None and remaining < 1e8 else None,
                                         caller or ANONYMOUS)
            async with contextlib.aclosing(self.core.generate(prepared)) as chunks:
                async for chunk in chunks:  # a client that goes away cancels this task: the workers abort
                    yield chunk
        except RouterError as e:
            if e.code in _RETRYABLE:
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s or self.core.retry_after_s)),))
            await context.abort(e.code, e.message)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.core.model_name,
                                                          max_model_len=self.core.max_model_len)])
