"""The KVStore gRPC service over a StoreIndex: it hands out offsets in the store's transfer segment and grants
the asking engine the matching byte ranges (read for a lookup, write for a reservation; the segment is guarded,
so a two-sided transport moves nothing else), and checks every commit's checksum over its own bytes."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import torch

from common.kv_store_record import MAX_BLOCKS_PER_CALL
from kv_store.index import NamespaceError, StoreIndex
from kv_store.metrics import STORE_CALLS
from kv_transfer.checksum import block_checksum
from kv_transfer.grants import GrantKey
from kv_transfer.transfer_engine import TransferEngine
from tandem.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger(__name__)
MAX_TOKENS_PER_BLOCK = 1024
EVENTS_INTERVAL_S = 0.1  # changes are streamed at most this often, batched


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store_id: str, index: StoreIndex, memory: torch.Tensor, transfer: TransferEngine,
                 segment: str) -> None:
        """`memory`: the flat uint8 tensor registered as `segment` (guarded) on `transfer`."""
        self.store_id = store_id
        self.index = index
        self.memory = memory
        self.transfer = transfer
        self.segment = segment
        self._grant_ends: list[tuple[float, int, list[GrantKey]]] = []  # (when, tie-break, keys): a heap
        self._order = itertools.count()
        self._reservation_grants: dict[str, tuple[float, list[GrantKey]]] = {}  # tag → (when it lapses, keys)

    async def Lookup(self, request: kvstore_pb2.StoreLookupRequest,
                     context: grpc.aio.ServicerContext) -> kvstore_pb2.StoreLookupResponse:
        await self._check_size(context, "Lookup", len(request.hashes), request.engine_id)
        hits = self.index.lookup(request.namespace, list(request.hashes))
        tag = f"kvstore-read/{uuid.uuid4().hex}"
        if hits:
            offsets = np.array([h.offset for h in hits], dtype=np.int64)
            keys = self.transfer.grant(self.segment, request.engine_id, tag, offsets,
                                       np.full(len(hits), self.index.block_bytes, dtype=np.int64), ops=("read",))
            heapq.heappush(self._grant_ends, (time.monotonic() + self.index.read_lease_s, next(self._order), keys))
        STORE_CALLS.labels("lookup", "ok").inc()
        return kvstore_pb2.StoreLookupResponse(
            hits=[kvstore_pb2.StoreHit(hash=h.block_hash, offset=h.offset, checksum=h.checksum, token_ids=h.token_ids)
                  for h in hits], segment=self.segment, tag=tag, lease_seconds=self.index.read_lease_s)

    async def Reserve(self, request: kvstore_pb2.StoreReserveRequest,
                      context: grpc.aio.ServicerContext) -> kvstore_pb2.StoreReserveResponse:
        await self._check_size(context, "Reserve", len(request.blocks), request.engine_id)
        if not request.namespace or request.block_bytes <= 0 or any(
                len(b.token_ids) > MAX_TOKENS_PER_BLOCK for b in request.blocks):
            STORE_CALLS.labels("reserve", "invalid_argument").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Reserve: a namespace, a positive block size and "
                                f"at most {MAX_TOKENS_PER_BLOCK} tokens per block are required")
        tag = f"kvstore-write/{uuid.uuid4().hex}"
        try:
            reserved = self.index.reserve(request.namespace, request.block_bytes,
                                          [(b.hash, tuple(b.token_ids)) for b in request.blocks], tag)
        except NamespaceError as e:
            STORE_CALLS.labels("reserve", "failed_precondition").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if reserved:
            offsets = np.array([offset for _, offset in reserved], dtype=np.int64)
            keys = self.transfer.grant(self.segment, request.engine_id, tag, offsets,
                                       np.full(len(reserved), self.index.block_bytes, dtype=np.int64), ops=("write",))
            self._reservation_grants[tag] = (time.monotonic() + self.index.reserve_ttl_s, keys)
        STORE_CALLS.labels("reserve", "ok").inc()
        return kvstore_pb2.StoreReserveResponse(
            reserved=[kvstore_pb2.StoreSlot(hash=h, offset=offset) for h, offset in reserved],
            segment=self.segment, tag=tag, ttl_seconds=self.index.reserve_ttl_s)

    async def Commit(self, request: kvstore_pb2.StoreCommitRequest,
                     context: grpc.aio.ServicerContext) -> kvstore_pb2.StoreCommitResponse:
        await self._check_size(context, "Commit", len(request.blocks))
        grant = self._reservation_grants.pop(request.tag, None)
        if grant is not None:  # written or not, nothing more may be
            self.transfer.revoke(grant[1])
        written = {b.hash: b.checksum for b in request.blocks if not b.abandoned}
        try:
            self.index.abandon(request.namespace, request.tag, [b.hash for b in request.blocks if b.abandoned])
            slots = self.index.reserved(request.namespace, request.tag, list(written))
        except NamespaceError as e:
            STORE_CALLS.labels("commit", "failed_precondition").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        size = self.index.block_bytes
        actual = await asyncio.to_thread(lambda: [block_checksum(self.memory[o:o + size]) for _, o in slots])
        verdicts = [(h, written[h] == crc, crc) for (h, _), crc in zip(slots, actual, strict=True)]
        accepted, rejected = self.index.commit(request.tag, verdicts)
        rejected += len(written) - len(slots)  # lapsed, or never reserved under this tag
        if rejected:
            log.info("commit %s: %d blocks rejected (checksum mismatch or reservation lapsed)", request.tag, rejected)
        STORE_CALLS.labels("commit", "ok").inc()
        return kvstore_pb2.StoreCommitResponse(accepted=accepted, rejected=rejected)

    async def Verify(self, request: kvstore_pb2.StoreVerifyRequest,
                     context: grpc.aio.ServicerContext) -> kvstore_pb2.StoreVerifyResponse:
        await self._check_size(context, "Verify", len(request.hashes))
        size = self.index.block_bytes

        def intact(offset: int, checksum: int) -> bool:
            return block_checksum(self.memory[offset:offset + size]) == checksum

        try:
            dropped = await asyncio.to_thread(self.index.drop_unless, request.namespace, list(request.hashes), intact)
        except NamespaceError as e:
            STORE_CALLS.labels("verify", "failed_precondition").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if dropped:
            log.warning("dropped %d blocks that failed their checksum over the store's own bytes", dropped)
        STORE_CALLS.labels("verify", "ok").inc()
        return kvstore_pb2.StoreVerifyResponse(dropped=dropped)

    async def Stats(self, request: kvstore_pb2.StoreStatsRequest,
                    context: grpc.aio.ServicerContext) -> kvstore_pb2.StoreStats:
        s = self.index.stats()
        try:
            self.index.check_integrity()
            problem = ""
        except AssertionError as e:
            problem = str(e)
        return kvstore_pb2.StoreStats(integrity_error=problem,
            store_id=self.store_id, namespace=s.namespace, block_bytes=s.block_bytes,
            capacity_blocks=s.capacity_blocks, readable_blocks=s.readable_blocks, reserved_blocks=s.reserved_blocks,
            lookups=s.lookups, hits=s.hits, committed=s.committed, rejected=s.rejected, evicted=s.evicted,
            lapsed=s.lapsed, dropped=s.dropped)

    async def Events(self, request: kvstore_pb2.StoreEventsRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[kvstore_pb2.StoreEventBatch]:
        version, readable = self.index.snapshot()
        yield kvstore_pb2.StoreEventBatch(snapshot=True, namespace=self.index.namespace, readable=readable)
        while True:
            await asyncio.sleep(EVENTS_INTERVAL_S)
            changes = self.index.changes_since(version)
            if changes is None:  # fell behind the log: start over
                version, readable = self.index.snapshot()
                yield kvstore_pb2.StoreEventBatch(snapshot=True, namespace=self.index.namespace, readable=readable)
                continue
            version, readable, removed = changes
            if readable or removed:
                yield kvstore_pb2.StoreEventBatch(namespace=self.index.namespace, readable=readable, removed=removed)

    def housekeeping(self) -> None:
        """Free lapsed reservations and end the grants of read leases that ran out (called periodically)."""
        self.index.expire()
        now = time.monotonic()
        for tag in [t for t, (lapses, _) in self._reservation_grants.items() if lapses <= now]:
            self.transfer.revoke(self._reservation_grants.pop(tag)[1])
        while self._grant_ends and self._grant_ends[0][0] <= now:
            self.transfer.revoke(heapq.heappop(self._grant_ends)[2])

    async def _check_size(self, context: grpc.aio.ServicerContext, call: str, count: int,
                          engine_id: str | None = None) -> None:
        """Abort with INVALID_ARGUMENT past MAX_BLOCKS_PER_CALL blocks, or without the caller's engine id where
        the call grants it something (`engine_id` given: Lookup, Reserve)."""
        if count > MAX_BLOCKS_PER_CALL or engine_id == "":
            STORE_CALLS.labels(call.lower(), "invalid_argument").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{call}: at most {MAX_BLOCKS_PER_CALL} blocks, and the caller's engine id, "
                                f"are required (got {count} blocks)")
