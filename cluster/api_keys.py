"""API keys on the router's public APIs: gRPC tandem.v1.Inference takes the metadata
`authorization: Bearer <key>`, the OpenAI HTTP API the header `Authorization: Bearer <key>` (as
OpenAI clients send it). A missing or wrong key gets gRPC UNAUTHENTICATED / HTTP 401 (an
OpenAI-shaped error and `WWW-Authenticate: Bearer`).

Open without a key: HTTP /health and /metrics (probes and Prometheus) and /openapi.json, gRPC
health checking and reflection (they reveal no prompt and no answer, only the API's shape).

Keys come from a file (one per line; blank lines and lines starting with # are skipped) and/or a
comma-separated variable (TANDEM_API_KEYS). A presented key is checked against every key, each
by `hmac.compare_digest` over SHA-256 digests (constant time, no early exit, no length leak).
Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import web

from common.files import read_file

OPEN_HTTP_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})
PROTECTED_GRPC_PREFIX = "/tandem.v1.Inference/"
MISSING = "no API key: send `authorization: Bearer <key>`"
WRONG = "invalid API key"


def _digest(key: str) -> bytes:
    # surrogateescape: a header with non-UTF-8 bytes (aiohttp keeps them as lone surrogates) is just a wrong key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.digests:
            raise ValueError("no API key given")

    @staticmethod
    def load(path: str | None, inline: str) -> ApiKeys | None:
        """The keys of the file at `path` and of `inline` (comma separated); None if neither names one."""
        keys = [k.strip() for k in inline.split(",") if k.strip()]
        if path is not None:
            lines = read_file(path, "API key file").decode().splitlines()
            from_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not from_file:
                raise ValueError(f"API key file {path!r} holds no key")
            keys += from_file
        if any(len(k.split()) != 1 for k in keys):
            raise ValueError("an API key must not contain whitespace")
        return ApiKeys(tuple(_digest(k) for k in keys)) if keys else None

    def accepts(self, authorization: str | None) -> bool:
        """Whether `authorization` ("Bearer <key>", scheme case-insensitive) names one of the keys."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        presented = _digest(key.strip()) if scheme.lower() == "bearer" else b""
        matched = False
        for digest in self.digests:  # every key, whatever matched before
            matched |= hmac.compare_digest(digest, presented)
        return matched

    def refusal(self, authorization: str | None) -> str:
        return WRONG if authorization else MISSING


_HANDLER_OF_SHAPE = {(False, False): grpc.unary_unary_rpc_method_handler,
                     (False, True): grpc.unary_stream_rpc_method_handler,
                     (True, False): grpc.stream_unary_rpc_method_handler,
                     (True, True): grpc.stream_stream_rpc_method_handler}


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to tandem.v1.Inference without a valid key, before the servicer sees them."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_GRPC_PREFIX):
            return handler
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        if self.keys.accepts(authorization):
            return handler
        message = self.keys.refusal(authorization)

        async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        shape = _HANDLER_OF_SHAPE[(handler.request_streaming, handler.response_streaming)]
        return shape(refuse, request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)


def http_middleware(keys: ApiKeys) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def require_api_key(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if request.path in OPEN_HTTP_PATHS or keys.accepts(authorization):
            return await handler(request)
        body = {"error": {"message": keys.refusal(authorization), "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Bearer realm="tandem"'})
    return require_api_key
