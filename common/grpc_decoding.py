"""A request whose bytes do not decode as the method's message gets INVALID_ARGUMENT with the
decoder's message. Left to itself, grpc-aio answers it UNKNOWN ("Unexpected <class DecodeError>")
and logs a traceback at ERROR: the client's mistake would read as the server's.

Covers every method with a unary request (tandem.v1.Inference, health checking) whose servicer
method is a coroutine or an async generator; request-streaming methods (reflection) keep grpc's
behaviour."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Undecodable:
    """What the lenient deserializer hands the servicer instead of a message it could not parse."""
    reason: str


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # protobuf's DecodeError, or any deserializer's: the bytes came from the client
            return Undecodable(str(e) or type(e).__name__)
    return deserialize


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {request.reason}")


def _unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        return await behavior(request, context)
    return serve


def _streaming(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def serve(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        async for response in behavior(request, context):
            yield response
    return serve


class RejectUndecodable(grpc.aio.ServerInterceptor):
    """Install it last (innermost): it rewrites the handler the servicer registered."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if inspect.isasyncgenfunction(behavior):
            wrapped: Any = _streaming(behavior)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = _unary(behavior)
        else:  # a synchronous servicer method: not ours to rewrite
            return handler
        make = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
                else grpc.unary_unary_rpc_method_handler)
        return make(wrapped, request_deserializer=_lenient(handler.request_deserializer),
                    response_serializer=handler.response_serializer)
