"""The router's live view of the workers: etcd discovery, one gRPC channel per worker, the
requests the router has in flight on each, and the block hashes each one's prefix cache holds
(followed through its KVEvents stream). Workers whose TLS setting differs from the router's are
left out (common.tls: the cluster is all-TLS or all-plaintext)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc

from cluster.discovery import WorkerDirectory
from cluster.router_metrics import CACHED_BLOCKS, KV_EVENT_BATCHES, KV_EVENT_HASHES, WORKERS
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
    events_task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def overlap_blocks(self, block_hashes: list[int]) -> int:
        """Leading blocks of a prompt its prefix cache holds (a prefix needs every block before it)."""
        count = 0
        for h in block_hashes:
            if h not in self.cached_blocks:
                break
            count += 1
        return count


class WorkerPool:
    def __init__(self, etcd: str, cluster: str, events_retry_s: float = 0.5, access: EtcdAccess | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.directory = WorkerDirectory(etcd, cluster, on_change=self._sync, access=access)
        self.events_retry_s = events_retry_s
        self.credentials = credentials  # None: plaintext to workers
        self._handles: dict[str, WorkerHandle] = {}  # by worker id
        self._mismatched: set[str] = set()  # worker ids already warned about

    async def start(self, timeout_s: float = 10.0) -> None:
        """Returns once the workers registered now are known (the first etcd listing is done)."""
        await self.directory.start()
        await self.directory.wait_until(lambda d: d.relists > 0, timeout_s)

    def workers(self, *roles: WorkerRole) -> list[WorkerHandle]:
        return [h for h in self._handles.values() if not roles or h.record.role in roles]

    def _sync(self) -> None:
        current = {w.worker_id: w for w in self.directory.workers() if self._tls_matches(w)}
        for worker_id in list(self._handles):
            handle = self._handles[worker_id]
            if current.get(worker_id) != handle.record:
                del self._handles[worker_id]
                asyncio.get_running_loop().create_task(self._close(handle))
        for worker_id, record in current.items():
            if worker_id not in self._handles:
                channel = open_channel(record.address, self.credentials)
                handle = WorkerHandle(record, channel, worker_pb2_grpc.WorkerStub(channel))
                handle.events_task = asyncio.get_running_loop().create_task(self._follow_events(handle))
                self._handles[worker_id] = handle
                log.info("worker %s (%s) at %s joined", worker_id, record.role, record.address)
        for role in ROLES:  # every pool, empty ones at 0: alerts on a pool with no workers need the zero
            WORKERS.labels(role).set(len(self.workers(role)))

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
                    if batch.cleared:
                        handle.cached_blocks.clear()
                    handle.cached_blocks.update(batch.stored_block_hashes)
                    handle.cached_blocks.difference_update(batch.removed_block_hashes)
                    CACHED_BLOCKS.labels(handle.worker_id).set(len(handle.cached_blocks))
            except grpc.aio.AioRpcError as e:
                log.debug("KV events of %s: %s", handle.worker_id, e.code().name)
            await asyncio.sleep(self.events_retry_s)

    async def _close(self, handle: WorkerHandle, drain_s: float = 600.0) -> None:
        """A worker that left may still be finishing (draining) this router's streams: its channel
        closes once they ended, or after `drain_s`."""
        log.info("worker %s left", handle.worker_id)
        with contextlib.suppress(KeyError):
            CACHED_BLOCKS.remove(handle.worker_id)
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
        for handle in handles:
            await self._close(handle, drain_s=0.0)
