"""The router's live view of the workers: etcd discovery, one gRPC channel per worker, the
requests the router has in flight on each, and the block hashes each one's prefix cache holds
(followed through its KVEvents stream). Workers whose TLS setting differs from the router's are
left out (common.tls: the cluster is all-TLS or all-plaintext).

Cost at a thousand workers: an etcd event updates the view in O(1) (only the keys it changed);
what every request reads (the workers of some roles in worker-id order, the cluster's limits) is
computed once after each change and cached until the next."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from cluster.discovery import WorkerDirectory
from cluster.router_metrics import (
    BLOCK_COST,
    CACHED_BLOCKS,
    KV_EVENT_BATCHES,
    KV_EVENT_HASHES,
    OFFLOADED_BLOCKS,
    WORKERS,
)
from common.etcd.access import EtcdAccess
from common.tls import open_channel
from common.worker_record import ROLES, WorkerRecord, WorkerRole
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerHandle:
    record: WorkerRecord
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    inflight: int = 0  # requests this router has on the worker now
    cached_blocks: set[int] = field(default_factory=set)  # block hashes in its prefix cache
    offloaded_blocks: set[int] = field(default_factory=set)  # readable in its second KV tier
    # loading a block from its second tier, in blocks of prefill work, as the worker measured it; until it has,
    # 1: a block there is priced as one to compute
    offload_block_cost: float = 1.0
    # a block read from the cluster KV store and loaded, likewise; 0: the worker uses no store (or has not measured)
    store_block_cost: float = 0.0
    events_task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def held_prefix(self, block_hashes: list[int]) -> tuple[int, int]:
        """(leading blocks of a prompt it holds, of those the ones it loads from its second tier), as its engine
        finds them: the pool's run of leading blocks, then the tier's run after it. A prefix needs every block
        before it."""
        held = 0
        while held < len(block_hashes) and block_hashes[held] in self.cached_blocks:
            held += 1
        offloaded = 0
        while held + offloaded < len(block_hashes) and block_hashes[held + offloaded] in self.offloaded_blocks:
            offloaded += 1
        return held + offloaded, offloaded

    def overlap_blocks(self, block_hashes: list[int]) -> int:
        """Leading blocks of a prompt it holds (pool or second tier)."""
        return self.held_prefix(block_hashes)[0]

    def prefill_work(self, block_hashes: list[int], in_store: Callable[[int], bool] | None = None) -> float:
        """The prompt's prefill here in blocks of work: blocks to compute, and blocks to load from the tier or to
        read from the cluster KV store (`in_store`; the run after what the worker holds, as its fetch reads it)
        at their measured prices."""
        held, offloaded = self.held_prefix(block_hashes)
        stored = 0
        if in_store is not None and self.store_block_cost > 0:
            while held + stored < len(block_hashes) and in_store(block_hashes[held + stored]):
                stored += 1
        return (len(block_hashes) - held - stored + offloaded * self.offload_block_cost
                + stored * self.store_block_cost)


class WorkerPool:
    def __init__(self, etcd: str, cluster: str, events_retry_s: float = 0.5, access: EtcdAccess | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.directory = WorkerDirectory(etcd, cluster, on_change=self._sync, access=access)
        self.events_retry_s = events_retry_s
        self.credentials = credentials  # None: plaintext to workers
        self._handles: dict[str, WorkerHandle] = {}  # by worker id
        # etcd keys of TLS-matching records (a worker id is normally under one key; under several, e.g.
        # re-registered in another role, one of them serves: the newest written, kept until it goes)
        self._id_of_key: dict[str, str] = {}
        self._keys_of: dict[str, set[str]] = {}
        self._served_from: dict[str, str] = {}  # worker id -> the key its handle's record came from
        self._role_counts: collections.Counter[str] = collections.Counter()  # handles by role
        self._mismatched: set[str] = set()  # worker ids already warned about
        # derived from _handles, emptied whenever it changes (invariant: never stale)
        self._views: dict[tuple[WorkerRole, ...], tuple[WorkerHandle, ...]] = {}
        self._limits: tuple[int, int] | None = None  # (max_model_len, block_size)

    async def start(self, timeout_s: float = 10.0) -> None:
        """Returns once the workers registered now are known (the first etcd listing is done)."""
        await self.directory.start()
        await self.directory.wait_until(lambda d: d.relists > 0, timeout_s)

    def workers(self, *roles: WorkerRole) -> tuple[WorkerHandle, ...]:
        """The workers of `roles` (all: none given), in worker-id order."""
        view = self._views.get(roles)
        if view is None:
            view = self._views[roles] = tuple(sorted(
                (h for h in self._handles.values() if not roles or h.record.role in roles),
                key=lambda h: h.record.worker_id))
        return view

    def handle(self, worker_id: str) -> WorkerHandle | None:
        return self._handles.get(worker_id)

    def limits(self) -> tuple[int, int]:
        """(the longest context every worker takes (0: none says), the first worker's KV block size
        (16 with no worker)): what the router checks and hashes requests against."""
        if self._limits is None:
            workers = self.workers()
            lengths = [w.record.max_model_len for w in workers if w.record.max_model_len]
            self._limits = (min(lengths) if lengths else 0, workers[0].record.block_size if workers else 16)
        return self._limits

    def _sync(self) -> None:
        changed_keys = self.directory.take_changes()
        if changed_keys is None:  # a listing: the whole view again
            self._id_of_key = {key: r.worker_id for key, r in self.directory.records().items()
                               if self._tls_matches(r)}
            self._keys_of = {}
            for key, worker_id in self._id_of_key.items():
                self._keys_of.setdefault(worker_id, set()).add(key)
            affected = set(self._handles) | set(self._keys_of)
            fresh: dict[str, str] = {}
        else:
            affected, fresh = set(), {}
            for key in changed_keys:
                record = self.directory.record_at(key)
                old_id = self._id_of_key.pop(key, None)
                if old_id is not None:
                    self._keys_of[old_id].discard(key)
                    affected.add(old_id)
                if record is not None and self._tls_matches(record):
                    self._id_of_key[key] = record.worker_id
                    self._keys_of.setdefault(record.worker_id, set()).add(key)
                    affected.add(record.worker_id)
                    fresh[record.worker_id] = key  # the newest record of an id serves
        changed = [self._serve(worker_id, fresh.get(worker_id)) for worker_id in affected]
        if any(changed):
            for role in ROLES:  # every pool, empty ones at 0: alerts on a pool with no workers need the zero
                WORKERS.labels(role).set(self._role_counts[role])

    def _serve(self, worker_id: str, fresh_key: str | None) -> bool:
        """Point the handle of `worker_id` at one of its keys' records: `fresh_key` (just written), else the
        key it serves from if still there, else any (None left: no handle). True if the handle changed."""
        keys = self._keys_of.get(worker_id) or set()
        if not keys:
            self._keys_of.pop(worker_id, None)
        serving = self._served_from.get(worker_id)
        key = fresh_key or (serving if serving in keys else min(keys, default=None))
        if key is None:
            self._served_from.pop(worker_id, None)
        else:
            self._served_from[worker_id] = key
        return self._set(worker_id, None if key is None else self.directory.record_at(key))

    def _set(self, worker_id: str, record: WorkerRecord | None) -> bool:
        """Make the handle of `worker_id` follow `record` (None: no handle); True if it changed."""
        handle = self._handles.get(worker_id)
        if handle is not None and handle.record == record:
            return False
        self._views, self._limits = {}, None  # before any change: never stale, even if what follows raises
        if handle is not None:
            del self._handles[worker_id]
            self._role_counts[handle.record.role] -= 1
            asyncio.get_running_loop().create_task(self._close(handle))
        if record is not None:
            channel = open_channel(record.address, self.credentials)
            handle = WorkerHandle(record, channel, worker_pb2_grpc.WorkerStub(channel))
            handle.events_task = asyncio.get_running_loop().create_task(self._follow_events(handle))
            self._handles[worker_id] = handle
            self._role_counts[record.role] += 1
            log.info("worker %s (%s) at %s joined", worker_id, record.role, record.address)
        return True

    def _tls_matches(self, record: WorkerRecord) -> bool:
        if record.tls == (self.credentials is not None):
            return True
        if record.worker_id not in self._mismatched:
            self._mismatched.add(record.worker_id)
            log.warning("ignoring worker %s at %s: it %s TLS, this router %s", record.worker_id, record.address,
                        "serves" if record.tls else "does not serve", "does not" if record.tls else "does")
        return False

    async def _follow_events(self, handle: WorkerHandle) -> None:
        while self._handles.get(handle.worker_id) is handle:
            try:
                async for batch in handle.stub.KVEvents(worker_pb2.KVEventsRequest()):
                    KV_EVENT_BATCHES.inc()
                    KV_EVENT_HASHES.labels("snapshot" if batch.cleared else "stored").inc(
                        len(batch.stored_block_hashes))
                    KV_EVENT_HASHES.labels("removed").inc(len(batch.removed_block_hashes))
                    KV_EVENT_HASHES.labels("offloaded").inc(len(batch.offloaded_block_hashes))
                    KV_EVENT_HASHES.labels("unoffloaded").inc(len(batch.unoffloaded_block_hashes))
                    if batch.cleared:
                        handle.cached_blocks.clear()
                        handle.offloaded_blocks.clear()
                    handle.cached_blocks.update(batch.stored_block_hashes)
                    handle.cached_blocks.difference_update(batch.removed_block_hashes)
                    handle.offloaded_blocks.update(batch.offloaded_block_hashes)
                    handle.offloaded_blocks.difference_update(batch.unoffloaded_block_hashes)
                    if batch.offload_block_cost > 0:
                        handle.offload_block_cost = batch.offload_block_cost
                        BLOCK_COST.labels(handle.worker_id, "offload").set(batch.offload_block_cost)
                    if batch.store_block_cost > 0:
                        handle.store_block_cost = batch.store_block_cost
                        BLOCK_COST.labels(handle.worker_id, "store").set(batch.store_block_cost)
                    CACHED_BLOCKS.labels(handle.worker_id).set(len(handle.cached_blocks))
                    OFFLOADED_BLOCKS.labels(handle.worker_id).set(len(handle.offloaded_blocks))
            except grpc.aio.AioRpcError as e:
                log.debug("KV events of %s: %s", handle.worker_id, e.code().name)
            await asyncio.sleep(self.events_retry_s)

    async def _close(self, handle: WorkerHandle, drain_s: float = 600.0) -> None:
        """A worker that left may still be finishing (draining) this router's streams: its channel
        closes once they ended, or after `drain_s`."""
        log.info("worker %s left", handle.worker_id)
        for gauge in (CACHED_BLOCKS, OFFLOADED_BLOCKS):
            with contextlib.suppress(KeyError):
                gauge.remove(handle.worker_id)
        for tier in ("offload", "store"):
            with contextlib.suppress(KeyError):
                BLOCK_COST.remove(handle.worker_id, tier)
        if handle.events_task is not None:
            handle.events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await handle.events_task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while handle.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.2)
        await handle.channel.close(grace=None)

    async def stop(self) -> None:
        await self.directory.stop()
        handles, self._handles = list(self._handles.values()), {}
        self._views, self._limits, self._role_counts = {}, None, collections.Counter()
        self._id_of_key, self._keys_of, self._served_from = {}, {}, {}
        for handle in handles:
            await self._close(handle, drain_s=0.0)
