"""The Worker service of a prefill worker: `Prefill` runs a prompt and pushes its KV, layer by
layer, into the blocks a decode worker reserved (kv_transfer.kv_push.KVPusher); it returns the
first sampled token (also carried by the push's final note)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError, RankCommandError
from engine.outputs import RequestOutput
from kv_transfer import TransferError
from kv_transfer.errors import HandshakeError
from kv_transfer.kv_connector import KVConnector
from kv_transfer.kv_push import KVPusher
from tandem.v1 import worker_pb2
from worker_runtime.convert import logprob_to_proto, prompt_logprobs_to_proto, sampling_from_proto
from worker_runtime.kv_events import KVEventHub
from worker_runtime.kv_store_client import KVStoreClient
from worker_runtime.metrics import KV_PUSHED_BYTES, PREFILL_TOKENS, WORKER_REQUESTS
from worker_runtime.servicer_base import WorkerServicerBase
from worker_runtime.tp_kv_rank import PushExpect, PushForget

log = logging.getLogger(__name__)


class PrefillWorkerServicer(WorkerServicerBase):
    def __init__(self, engine: AsyncEngine, worker_id: str, events: KVEventHub, connector: KVConnector,
                 pusher: KVPusher, max_admitted: int | None = None, store: KVStoreClient | None = None) -> None:
        """`store`: the cluster KV store's client; a prompt's blocks it holds are read, not computed."""
        super().__init__(engine, worker_id, "prefill", events, max_admitted)
        self.store = store
        self.connector = connector
        self.pusher = pusher
        self.block_size = engine.config.block_size

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        async with self.admission(context, "Prefill"):
            return await self._prefill(request, context)

    async def _prefill(self, request: worker_pb2.PrefillRequest,
                       context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            # one token: the first; stop strings and lengths are the decode worker's business
            params = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=())
            engine_request = self.engine.make_request(rid, prompt, params, cache_salt=request.cache_salt)
            # (a peer of another layout: refused here); the decode ranks this rank writes, whatever the degrees
            peer = await self.connector.connect_routes(request.decode_segment)
            groups = self.connector.groups.num_groups  # a hybrid layout's: every group's blocks in turn
            need = -(-len(prompt) // self.block_size) * groups
            if len(request.decode_block_ids) != need:
                raise ValueError(f"a {len(prompt)}-token prompt needs {need} blocks of {self.block_size} tokens"
                                 f"{f' ({groups} layer groups)' if groups > 1 else ''}, "
                                 f"{len(request.decode_block_ids)} were given")
        except HandshakeError as e:
            await self._fail(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except TransferError as e:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, f"cannot reach {request.decode_segment!r}: {e}")
        except ValueError as e:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        timeout = request.timeout_seconds or None
        blocks = list(request.decode_block_ids)
        try:  # the other ranks of a tensor-parallel worker push their KV heads themselves (worker_runtime.tp_kv_rank)
            await self.engine.rank_command(PushExpect(rid, request.decode_segment, tuple(blocks), timeout or 30.0))
        except BaseException as e:  # (some ranks may have taken it: none keeps it)
            await asyncio.shield(self._forget(rid))
            if not isinstance(e, RankCommandError | EngineDeadError):
                raise
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, f"cannot push to {request.decode_segment!r}: {e}")
        self.pusher.expect(rid, peer, blocks, timeout_s=timeout or 30.0)
        try:
            if self.store is not None and params.prompt_logprobs is None:  # those skip every cache
                await self.store.fetch(prompt, request.cache_salt)
            stream = await self.engine.add_request(engine_request)
            final: RequestOutput | None = None
            async with asyncio.timeout(timeout):
                async for out in stream:  # leaving early (cancel, deadline) aborts the request in the engine
                    final = out
        except ValueError as e:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except TimeoutError:
            await self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"prefill of {rid!r} ran past {timeout} s")
        finally:
            await asyncio.shield(self._forget(rid))
        assert final is not None
        if not final.token_ids:
            await self._fail(context, grpc.StatusCode.ABORTED, f"prefill of {rid!r} was aborted")
        cached = final.num_cached_tokens
        PREFILL_TOKENS.labels(self.worker_id, "cached").inc(cached)
        PREFILL_TOKENS.labels(self.worker_id, "computed").inc(len(prompt) - cached)
        response = worker_pb2.PrefillResponse(first_token_id=final.token_ids[0], num_cached_tokens=cached)
        if final.logprobs and final.logprobs[0] is not None:
            response.first_logprob.CopyFrom(logprob_to_proto(final.logprobs[0]))
        if final.prompt_logprobs is not None:
            response.prompt_logprobs.extend(prompt_logprobs_to_proto(final.prompt_logprobs))
        WORKER_REQUESTS.labels(self.worker_id, "Prefill", "ok").inc()
        return response

    async def _forget(self, rid: str) -> bool:
        """End the push of `rid` on every rank and count its bytes by (rank, decode rank); False when the other ranks
        of a tensor-parallel worker could not be told (their writes may go on)."""
        pushed: list[dict[int, int]] = [dict(self.pusher.forget(rid))]
        try:
            replies = await self.engine.rank_command(PushForget(rid))
        except (RankCommandError, EngineDeadError) as e:  # (a lost rank ends the worker: engine.parallel)
            log.warning("the other ranks did not end the push of %s: %s", rid, e)
            return False
        finally:
            for source, by_dest in enumerate(pushed):
                for dest, total in by_dest.items():
                    KV_PUSHED_BYTES.labels(self.worker_id, str(source), str(dest)).inc(total)
        for source, reply in enumerate(replies, start=1):
            assert isinstance(reply, dict)
            for dest, total in reply.items():
                KV_PUSHED_BYTES.labels(self.worker_id, str(source), str(dest)).inc(total)
        return True

    async def _fail(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        WORKER_REQUESTS.labels(self.worker_id, "Prefill", code.name.lower()).inc()
        await context.abort(code, message)

    async def Abort(self, request: worker_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        """After this returns no more KV of the request is written: the engine drops it between
        steps, and each step waits for its pushes before ending."""
        if not await self._forget(request.request_id):  # the decode side must not reuse the blocks yet
            await self._fail_abort(context, request.request_id)
        return await super().Abort(request, context)

    async def _fail_abort(self, context: grpc.aio.ServicerContext, rid: str) -> None:
        WORKER_REQUESTS.labels(self.worker_id, "Abort", "unavailable").inc()
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the other tensor-parallel ranks may still push {rid!r}")
