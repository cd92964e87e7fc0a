"""API keys on the router's public APIs: gRPC tandem.v1.Inference takes the metadata
`authorization: Bearer <key>`, the OpenAI HTTP API the header `Authorization: Bearer <key>` (as
OpenAI clients send it). A missing or wrong key gets gRPC UNAUTHENTICATED / HTTP 401 (an
OpenAI-shaped error and `WWW-Authenticate: Bearer`).

Open without a key: HTTP /health and /metrics (probes and Prometheus) and /openapi.json, gRPC
health checking and reflection (they reveal no prompt and no answer, only the API's shape).

Keys come from a file (one per line, `<key>` or `<name> <key>`; blank lines and lines starting
with # are skipped) and/or a comma-separated variable (TANDEM_API_KEYS). A presented key is
checked against every key, each by `hmac.compare_digest` over SHA-256 digests (constant time, no
early exit, no length leak). Keys are never logged.

A matched key is a `Caller`: its name (given in the file, or `key-<n>` by its place), which
metrics and per-key limits (cluster.key_limits) use, and its tenant, a hash of its digest that the
router puts into the prefix cache's salt so that tenants share no cached block. Neither reveals
the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import web

from common.files import read_file

OPEN_HTTP_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})
PROTECTED_GRPC_PREFIX = "/tandem.v1.Inference/"
MISSING = "no API key: send `authorization: Bearer <key>`"
WRONG = "invalid API key"
KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the API key's name and tenant ("" for both without API keys)."""

    key_name: str = ""
    tenant: str = ""


ANONYMOUS = Caller()


def _digest(key: str) -> bytes:
    # surrogateescape: a header with non-UTF-8 bytes (aiohttp keeps them as lone surrogates) is just a wrong key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _tenant(digest: bytes) -> str:
    return hashlib.blake2b(digest, digest_size=12, person=b"tandem-tenant").hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...]
    names: tuple[str, ...] = ()  # names[i] is digests[i]'s; default: key-<hash>

    def __post_init__(self) -> None:
        if not self.digests:
            raise ValueError("no API key given")
        if not self.names:
            object.__setattr__(self, "names", tuple(f"key-{i + 1}" for i in range(len(self.digests))))
        if len(self.names) != len(self.digests) or len(set(self.names)) != len(self.names):
            raise ValueError("every API key needs a name of its own")

    @staticmethod
    def load(path: str | None, inline: str) -> ApiKeys | None:
        """The keys of the file at `path` and of `inline` (comma separated); None if neither names one."""
        entries: list[tuple[str | None, str]] = [(None, k.strip()) for k in inline.split(",") if k.strip()]
        if any(len(k.split()) != 1 for _, k in entries):
            raise ValueError("an API key must not contain whitespace")
        if path is not None:
            lines = read_file(path, "API key file").decode().splitlines()
            from_file = [line.split() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not from_file:
                raise ValueError(f"API key file {path!r} holds no key")
            for i, fields in enumerate(from_file):
                if len(fields) > 2 or (len(fields) == 2 and not KEY_NAME.fullmatch(fields[0])):
                    raise ValueError(f"API key file {path!r}, entry {i + 1}: write `<key>` or `<name> <key>` "
                                     "(a name of letters, digits, _ . -), with no whitespace in the key")
                entries.append((fields[0], fields[1]) if len(fields) == 2 else (None, fields[0]))
        if not entries:
            return None
        digests = tuple(_digest(k) for _, k in entries)
        # an unnamed key is named by its place (never by anything derived from the key: /metrics is open)
        names = tuple(name or f"key-{i + 1}" for i, (name, _) in enumerate(entries))
        if len(set(digests)) < len(digests):
            raise ValueError("an API key is given twice")
        return ApiKeys(digests, names)

    def accepts(self, authorization: str | None) -> bool:
        """Whether `authorization` ("Bearer <key>", scheme case-insensitive) names one of the keys."""
        return self._match(authorization) is not None

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller whose key `authorization` names (None: no such key)."""
        index = self._match(authorization)
        return None if index is None else Caller(self.names[index], _tenant(self.digests[index]))

    def _match(self, authorization: str | None) -> int | None:
        scheme, _, key = (authorization or "").strip().partition(" ")
        presented = _digest(key.strip()) if scheme.lower() == "bearer" else b""
        matched: int | None = None
        for i, digest in enumerate(self.digests):  # every key, whatever matched before
            if hmac.compare_digest(digest, presented):
                matched = i
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


def caller_of(request: web.Request) -> Caller:
    """The caller the API-key middleware found for this request (ANONYMOUS without keys)."""
    caller = request.get("tandem.caller")
    return caller if isinstance(caller, Caller) else ANONYMOUS


def http_middleware(keys: ApiKeys) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def require_api_key(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if request.path in OPEN_HTTP_PATHS:
            return await handler(request)
        caller = keys.caller(authorization)
        if caller is not None:
            request["tandem.caller"] = caller
            return await handler(request)
        body = {"error": {"message": keys.refusal(authorization), "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Bearer realm="tandem"'})
    return require_api_key
