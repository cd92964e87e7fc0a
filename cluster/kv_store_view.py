"""The router's view of the cluster KV stores: which block hashes each holds readable, followed through its
Events stream (a snapshot, then the changes); the stores themselves read from etcd every `poll_s`. A block in a
store costs a worker that uses the store its measured read, not its compute (cluster.routing)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from cluster.router_metrics import STORE_BLOCKS
from common.etcd.access import EtcdAccess
from common.etcd.lease import bounded, etcd_client
from common.kv_store_record import KVStoreRecord, kv_stores_prefix, records_from_listing
from common.tls import open_channel
from tandem.v1 import kvstore_pb2, kvstore_pb2_grpc
from worker_runtime.kv_store_client import owner

log = logging.getLogger(__name__)
OWNERS_REMEMBERED = 1 << 20


class KVStoreView:
    def __init__(self, etcd: str, cluster: str, access: EtcdAccess | None = None,
                 credentials: grpc.ChannelCredentials | None = None, poll_s: float = 2.0,
                 events_retry_s: float = 0.5) -> None:
        self.etcd, self.cluster, self.access, self.credentials = etcd, cluster, access, credentials
        self.poll_s, self.events_retry_s = poll_s, events_retry_s
        self._records: dict[str, KVStoreRecord] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, set[int]] = {}  # store id → readable block hashes
        self._task: asyncio.Task[None] | None = None
        self._listed: list[str] = []  # every store in etcd, followed or not: the workers shard over them all
        self._owner_of: dict[int, str] = {}  # block hash → its store, for the stores listed now

    def holds(self, block_hash: int) -> bool:
        """Whether the store a worker would ask for the block (its rendezvous owner among the stores listed in
        etcd, as the workers pick it) holds it readable."""
        if not self._listed:
            return False
        store_id = self._owner_of.get(block_hash)
        if store_id is None:  # routing asks for the same blocks once per worker: hashed once
            if len(self._owner_of) > OWNERS_REMEMBERED:
                self._owner_of.clear()
            store_id = self._owner_of[block_hash] = owner(self._listed, block_hash)
        return block_hash in self._held.get(store_id, ())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="kv-store-view")

    async def stop(self) -> None:
        for task in [*self._followers.values(), *([self._task] if self._task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._followers.clear()

    async def _poll(self) -> None:
        client = etcd_client(self.etcd, 5.0, self.access)
        while True:
            try:
                listed = await bounded(client.get_prefix(kv_stores_prefix(self.cluster).encode()), 5.0)
            except Exception as e:  # etcd unreachable: keep the last view
                log.debug("listing the KV stores failed: %s", e)
            else:
                self._apply(records_from_listing(listed))
            await asyncio.sleep(self.poll_s)

    def _apply(self, records: dict[str, KVStoreRecord]) -> None:
        if sorted(records) != self._listed:
            self._listed = sorted(records)
            self._owner_of.clear()
        for store_id in [s for s in self._records if self._records[s] != records.get(s)]:
            del self._records[store_id]
            self._followers.pop(store_id).cancel()
            self._held.pop(store_id, None)
            with contextlib.suppress(KeyError):
                STORE_BLOCKS.remove(store_id)
        for store_id, record in records.items():
            if store_id not in self._records and record.tls == (self.credentials is not None):
                self._records[store_id] = record
                self._followers[store_id] = asyncio.create_task(self._follow(record), name=f"kv-store-{store_id}")

    async def _follow(self, record: KVStoreRecord) -> None:
        while True:
            try:
                async with open_channel(record.address, self.credentials) as channel:
                    stream = kvstore_pb2_grpc.KVStoreStub(channel).Events(kvstore_pb2.StoreEventsRequest())
                    async for batch in stream:
                        held = self._held.setdefault(record.store_id, set())
                        if batch.snapshot:
                            held.clear()
                        held.update(batch.readable)
                        held.difference_update(batch.removed)
                        STORE_BLOCKS.labels(record.store_id).set(len(held))
            except grpc.aio.AioRpcError as e:
                log.debug("KV store %s events: %s", record.store_id, e.code().name)
            except Exception:  # never stop following a listed store: its view would go stale
                log.exception("following the events of KV store %s failed", record.store_id)
            self._held.pop(record.store_id, None)  # unknown until its next snapshot: nothing credited meanwhile
            await asyncio.sleep(self.events_retry_s)
