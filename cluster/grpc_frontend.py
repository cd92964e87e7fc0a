"""The public gRPC service, tandem.v1.Inference, on the router. A chat with tools is read as the
HTTP API reads it (cluster.openai_tools): the chunks' text is what lies outside the calls, and the
calls come in the last chunk."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from cluster.api_keys import ANONYMOUS, ApiKeys
from cluster.openai_fields import BadRequest
from cluster.openai_tools import ToolCallStream, read_grpc_tools
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
            caller = ANONYMOUS if self.keys is None else self.keys.caller(
                dict(context.invocation_metadata() or ()).get("authorization"))
            if caller is None:  # the interceptor refuses such calls first; never serve one as anonymous
                raise RouterError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
            try:
                use = read_grpc_tools(request)
            except BadRequest as e:
                raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            prepared = self.core.prepare(request, remaining if remaining is not None and remaining < 1e8 else None,
                                         caller)
            calls = ToolCallStream(use) if use is not None else None
            async with contextlib.aclosing(self.core.generate(prepared)) as chunks:
                async for chunk in chunks:  # a client that goes away cancels this task: the workers abort
                    if calls is not None:
                        _read_calls(calls, chunk)
                    yield chunk
        except RouterError as e:
            if e.code in _RETRYABLE:
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s or self.core.retry_after_s)),))
            await context.abort(e.code, e.message)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.core.model_name,
                                                          max_model_len=self.core.max_model_len)])


def _read_calls(calls: ToolCallStream, chunk: pb.GenerateResponse) -> None:
    """The chunk's text cut to the content outside tool calls; the last chunk gets the calls."""
    chunk.text = calls.feed(chunk.text)
    if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        rest, found = calls.finish()
        chunk.text += rest
        chunk.tool_calls.extend(pb.ToolCall(id=c["id"], name=c["function"]["name"],
                                            arguments=c["function"]["arguments"]) for c in found)
