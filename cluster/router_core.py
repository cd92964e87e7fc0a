"""The router's request path, shared by the gRPC and the HTTP front: validate and tokenize once,
admit, route (cluster/routing.py), stream from the decode worker, account.

Errors reach the fronts as RouterError(status, message): invalid input INVALID_ARGUMENT, unknown
model NOT_FOUND, no worker UNAVAILABLE, overload RESOURCE_EXHAUSTED, deadline DEADLINE_EXCEEDED.
A decode worker lost before any token is replaced by another one; one lost mid-stream too, which
continues after the tokens already streamed (migration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from cluster import router_metrics as m
from cluster.api_keys import ANONYMOUS, Caller
from cluster.key_limits import KeyLimiter, KeyLimitExceeded, KeyLimits
from cluster.routing import Route, RoutingPolicy
from cluster.worker_pool import WorkerHandle, WorkerPool
from common.wire import QUEUE_FULL
from engine.block_manager import hash_blocks, salted_root
from engine.grammar import check_structured
from engine.tokenizer import Tokenizer
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2
from worker_runtime.convert import chat_from_proto, sampling_from_proto

log = logging.getLogger(__name__)

# worker statuses a client should see as they are; any other becomes UNAVAILABLE
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED}
# a decode worker failing with these is gone (killed, unreachable, its stream reset): try another. CANCELLED
# among them: a call the router cancels itself raises CancelledError here, never a status, so a CANCELLED
# status was the worker's side dropping the call (seen once in CI as a tensor-parallel group died mid-burst)
_WORKER_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
_MAX_DECODE_ATTEMPTS = 3


class RouterError(Exception):
    """`retry_after_s`: for a refusal worth retrying, when (None: the router's --retry-after-s)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str  # the client's, or one the router made up
    internal_id: str  # unique per attempt set: what the workers see
    prompt_token_ids: list[int]
    sampling: pb.SamplingParameters
    timeout_s: float
    priority: int
    # n > 1: the decode worker that holds the shared prompt's KV (choice 0's): this request goes
    # there and prefills from its prefix cache, so one prefill and one KV transfer serve every choice
    follow_worker: str = ""
    cache_salt: str = ""  # prefix-cache blocks are shared only under the same salt (see cache_salt)
    caller: Caller = ANONYMOUS  # its API key (limits and metrics by key name)


MAX_CLIENT_SALT_CHARS = 1024  # a client's cache_salt (the workers take the router's longer combination)


def cache_salt(tenant: str, client_salt: str) -> str:
    """The prefix cache's salt of a request: its tenant's (API key's) and a digest of the client's
    own, kept apart unambiguously and short whatever the client sent ("" when there is neither:
    the cache is shared)."""
    if not tenant and not client_salt:
        return ""
    client = hashlib.sha256(client_salt.encode("utf-8", "surrogatepass")).hexdigest() if client_salt else ""
    return json.dumps([tenant, client])


class RouterCore:
    def __init__(self, pool: WorkerPool, tokenizer: Tokenizer, policy: RoutingPolicy, served_model_name: str,
                 max_inflight: int, request_timeout_s: float, retry_after_s: int = 1,
                 shared_prefix_cache: bool = False, key_limits: KeyLimits | None = None) -> None:
        self.pool = pool
        self.keys = KeyLimiter(key_limits)
        self.shared_prefix_cache = shared_prefix_cache  # True: tenants (API keys) share cached blocks
        self.tokenizer = tokenizer
        self._serving: dict[str, str] = {}  # internal id -> the decode worker of its current attempt
        self.policy = policy
        self._served_name = served_model_name
        self.max_inflight = max_inflight
        self.request_timeout_s = request_timeout_s
        self.retry_after_s = retry_after_s  # what the fronts tell a client refused with 429 / 503
        self.inflight = 0

    # -- models ---------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        if self._served_name:
            return self._served_name
        workers = self.pool.workers()
        return workers[0].record.model if workers else "tandem"

    @property
    def max_model_len(self) -> int:
        return self.pool.limits()[0]

    def block_size(self) -> int:
        return self.pool.limits()[1]

    # -- validation -------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        """RouterError(NOT_FOUND) unless `model` is empty or the served model's name."""
        known = bool(self._served_name or self.pool.workers())  # with no worker yet, generate says UNAVAILABLE
        if model and known and model != self.model_name:
            raise RouterError(grpc.StatusCode.NOT_FOUND,
                              f"model {model!r} is not served here; this cluster serves {self.model_name!r}")

    def prepare(self, request: pb.GenerateRequest, time_remaining: float | None = None,
                caller: Caller = ANONYMOUS) -> PreparedRequest:
        """Validate and tokenize; raises RouterError(INVALID_ARGUMENT or NOT_FOUND). `caller`: its
        API key (cluster.api_keys), whose tenant salts the prefix cache unless it is shared."""
        self.check_model(request.model)
        if len(request.cache_salt) > MAX_CLIENT_SALT_CHARS:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"cache_salt is longer than {MAX_CLIENT_SALT_CHARS} characters")
        try:
            tokens = self._tokens(request)
            params = sampling_from_proto(request.sampling)  # the same validation the worker will apply
            if params.structured is not None:
                check_structured(params.structured)  # the specification parses (the worker compiles it)
        except ValueError as e:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        limit = self.max_model_len
        if limit and len(tokens) >= limit:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt has {len(tokens)} tokens but the context holds {limit} "
                              f"(prompt + at least one generated token): shorten the prompt")
        timeouts = [self.request_timeout_s]
        if request.HasField("timeout_seconds"):
            if not 0 < request.timeout_seconds < math.inf:  # NaN fails too
                raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"timeout_seconds must be positive and finite, got {request.timeout_seconds}")
            timeouts.append(request.timeout_seconds)
        if time_remaining is not None:
            timeouts.append(time_remaining)
        internal = uuid.uuid4().hex
        salt = cache_salt("" if self.shared_prefix_cache else caller.tenant, request.cache_salt)
        return PreparedRequest(request.request_id or internal, internal, tokens, request.sampling, min(timeouts),
                               request.priority, cache_salt=salt, caller=caller)

    def _tokens(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text:
                raise ValueError("the prompt text is empty")
            tokens = self.tokenizer.encode(request.text)
        elif kind == "token_ids":
            tokens = list(request.token_ids.ids)
            bad = next((t for t in tokens if t < 0), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is negative")
        elif kind == "chat":
            messages, tools = chat_from_proto(request.chat)
            tokens = self.tokenizer.apply_chat_template(messages, tools=tools)
        else:
            raise ValueError("the request has no input: set text, token_ids or chat")
        if not tokens:
            raise ValueError("the prompt is empty")
        return tokens

    # -- serving ------------------------------------------------------------------------------------------
    async def generate(self, req: PreparedRequest) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the request's chunks (request ids rewritten to the client's). Closing the
        iterator early cancels the request on the workers."""
        if self.inflight >= self.max_inflight:
            m.REQUESTS.labels("resource_exhausted").inc()
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the router has {self.inflight} requests in flight (limit {self.max_inflight}): "
                              f"retry later")
        try:  # a follower (n > 1) reads the prompt from the cache: its prompt is counted with choice 0
            self.keys.admit(req.caller, 0 if req.follow_worker else len(req.prompt_token_ids))
        except KeyLimitExceeded as e:
            m.REQUESTS.labels("resource_exhausted").inc()
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message, e.retry_after_s) from None
        arrival = time.monotonic()
        deadline = arrival + req.timeout_s
        self.inflight += 1
        m.INFLIGHT.inc()
        outcome = "cancelled"
        decoding = False  # past its first token (m.DECODING counts it)
        try:
            m.PROMPT_TOKENS.inc(len(req.prompt_token_ids))
            async for chunk in self._stream(req, arrival, deadline):
                if chunk.token_ids and not decoding:
                    decoding = True
                    m.DECODING.inc()
                self.keys.count(req.caller, len(chunk.token_ids))
                yield chunk
            outcome = "ok"
        except RouterError as e:
            outcome = e.code.name.lower()
            raise
        finally:
            self.keys.release(req.caller, outcome)
            self.inflight -= 1
            self._serving.pop(req.internal_id, None)
            m.INFLIGHT.dec()
            if decoding:
                m.DECODING.dec()
            m.REQUESTS.labels(outcome).inc()

    async def _stream(self, req: PreparedRequest, arrival: float, deadline: float
                      ) -> AsyncIterator[pb.GenerateResponse]:
        """Invariant: `streamed` is exactly the token ids the client has been sent, in order. A decode
        worker lost before any token is replaced (retry); one lost mid-stream is replaced by another
        that recomputes prompt + `streamed` and continues after them (migration), so the client's
        stream goes on with no token repeated or lost."""
        hashes = hash_blocks(req.prompt_token_ids, self.block_size(), salted_root(req.cache_salt))
        # a request for prompt logprobs computes its whole prompt (engine.sequence): no cache to credit,
        # until a migration drops them (without_prompt_logprobs)
        scores_prompt = req.sampling.HasField("prompt_logprobs")
        tried: set[str] = set()  # each decode worker is tried at most once
        streamed: list[int] = []
        latency = _Latency(arrival)
        refused: RouterError | None = None  # the last admission refusal (a full queue)
        attempt = losses = 0
        while True:
            try:
                follow = req.follow_worker if not tried else ""  # a retry or migration: any worker
                cached = [] if scores_prompt and not streamed else hashes
                route = self._route(cached, tried, with_prefill=not streamed, prefer=follow)
            except RouterError as no_worker:
                if streamed:
                    raise RouterError(grpc.StatusCode.UNAVAILABLE, f"the decode worker was lost after {len(streamed)} "
                                      f"tokens and none could continue: {(refused or no_worker).message}") from None
                raise (refused or no_worker) from None
            tried.add(route.decode.worker_id)
            self._serving[req.internal_id] = route.decode.worker_id
            route.decode.inflight += 1
            prefilling = list(route.prefill[:1])  # counted against the prefill worker until the first token
            for p in prefilling:
                p.inflight += 1
            call = route.decode.stub.Generate(self._worker_request(req, route, deadline, attempt, streamed),
                                              timeout=max(deadline - time.monotonic(), 0.001))
            if attempt == 0:
                m.DISPATCH.observe(time.monotonic() - arrival)
            attempt += 1
            try:
                async for chunk in call:
                    while prefilling:
                        prefilling.pop().inflight -= 1
                    latency.observe(chunk)
                    chunk.request_id = req.request_id
                    streamed.extend(chunk.token_ids)
                    yield chunk
                    if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        return  # complete: whatever the call's status turns out to be
                return
            except grpc.aio.AioRpcError as e:
                code, worker = e.code(), route.decode.worker_id
                if _queue_full(e):  # refused at once, nothing generated: another worker may have room
                    m.RETRIES.labels(code.name.lower()).inc()
                    refused = RouterError(code, f"every decode worker is busy ({worker}: {e.details()})")
                    continue
                if worker_lost(code) and losses + 1 < _MAX_DECODE_ATTEMPTS and time.monotonic() < deadline:
                    losses += 1
                    (m.MIGRATIONS if streamed else m.RETRIES).labels(code.name.lower()).inc()
                    log.warning("decode worker %s failed (%s) after %d tokens of request %r: %s", worker, code.name,
                                len(streamed), req.request_id, "migrating" if streamed else "retrying")
                    continue
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # gRPC's own: the request is over a size limit
                    code = grpc.StatusCode.INVALID_ARGUMENT
                raise RouterError(client_status(code),
                                  f"decode worker {worker}: {e.details()}") from e
            finally:
                call.cancel()  # no-op once finished; otherwise the workers abort and free the blocks
                route.decode.inflight -= 1
                for p in prefilling:
                    p.inflight -= 1

    def serving_worker(self, internal_id: str) -> str:
        """The decode worker a request in flight is on now ("" before it is routed, or after)."""
        return self._serving.get(internal_id, "")

    def _route(self, hashes: list[int], exclude: set[str], with_prefill: bool, prefer: str = "") -> Route:
        decode_pool: Sequence[WorkerHandle] = self.pool.workers("decode", "both")
        if exclude:
            decode_pool = [w for w in decode_pool if w.worker_id not in exclude]
        if not decode_pool:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "no decode (or aggregated) worker is available")
        preferred = self.pool.handle(prefer) if prefer and prefer not in exclude else None
        if preferred is not None and preferred.record.role in ("decode", "both"):
            # it holds the prompt's KV: it prefills from its prefix cache, no prefill worker
            decode_pool, with_prefill = [preferred], False
        route = self.policy.route(decode_pool, self.pool.workers("prefill") if with_prefill else [], hashes)
        m.ROUTED.labels("decode", route.decode.worker_id).inc()
        first = route.prefill[0] if route.prefill else route.decode
        if route.prefill:
            m.ROUTED.labels("prefill", first.worker_id).inc()
        m.PREFIX_OVERLAP.labels(first.worker_id).inc(route.overlap_blocks)
        return route

    @staticmethod
    def _worker_request(req: PreparedRequest, route: Route, deadline: float, attempt: int, streamed: list[int]
                        ) -> worker_pb2.WorkerGenerateRequest:
        targets = [worker_pb2.PrefillTarget(prefill_address=p.record.address,
                                            prefill_engine_id=p.record.transfer.get("engine_id", ""))
                   for p in route.prefill]
        # a migration: the client has the prompt logprobs (the first chunk carried them)
        sampling = without_prompt_logprobs(req.sampling) if streamed else req.sampling
        return worker_pb2.WorkerGenerateRequest(
            request_id=f"{req.internal_id}-{attempt}", prompt_token_ids=req.prompt_token_ids, sampling=sampling,
            timeout_seconds=max(deadline - time.monotonic(), 0.001), priority=req.priority, prefill=targets,
            resume_token_ids=streamed, cache_salt=req.cache_salt)


def without_prompt_logprobs(sampling: pb.SamplingParameters) -> pb.SamplingParameters:
    """`sampling` not asking for prompt logprobs (a copy when it did)."""
    if not sampling.HasField("prompt_logprobs"):
        return sampling
    copy = pb.SamplingParameters()
    copy.CopyFrom(sampling)
    copy.ClearField("prompt_logprobs")
    return copy


def worker_lost(code: grpc.StatusCode) -> bool:
    """A decode worker's call that ended with `code` lost the worker: the router tries another one."""
    return code in _WORKER_LOST


def client_status(code: grpc.StatusCode) -> grpc.StatusCode:
    """What a client sees of a worker's final status (after any retries)."""
    return code if code in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE


def _queue_full(e: grpc.aio.AioRpcError) -> bool:
    """A worker's admission refusal (worker_runtime.servicer_base), not gRPC's own RESOURCE_EXHAUSTED."""
    return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and any(
        key == QUEUE_FULL for key, _ in (e.trailing_metadata() or ()))


class _Latency:
    """The router's latency histograms for one request, across every decode worker it went to."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.last_token_at: float | None = None

    def observe(self, chunk: pb.GenerateResponse) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            if self.last_token_at is None:
                m.TTFT.observe(now - self.arrival)
            else:
                m.ITL.observe((now - self.last_token_at) / len(chunk.token_ids))
            self.last_token_at = now
            m.GENERATION_TOKENS.inc(len(chunk.token_ids))
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            m.E2E.observe(now - self.arrival)


def healthy(pool: WorkerPool) -> bool:
    """The cluster can serve: at least one decode or aggregated worker."""
    return bool(pool.workers("decode", "both"))

