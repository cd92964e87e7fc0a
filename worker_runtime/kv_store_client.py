"""A worker's side of the cluster KV store (kv_store/): its second tier is the staging area both ways.

- Fetch, before a prompt is admitted: the full blocks after those the pool and the tier hold are looked up in
  the stores (each block in the store its hash picks: rendezvous hashing over the stores listed in etcd). The
  leading run of hits, its tokens checked, is read through the transfer engine into tier slots held for it,
  each block checked against the store's CRC-32, and made readable in the tier; the scheduler then loads it
  into the pool like any tier hit. A miss, an error or the deadline: those blocks are computed, as without a
  store. No request waits longer than `timeout_s` for the store.
- Put, in the background: blocks the pool freed into the tier (pinned there meanwhile) are reserved in their
  store (a block it holds or is being written is left out), written from the tier slot, and committed with
  their CRC-32, which the store checks over its own bytes before anyone may read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
import torch

from common.etcd.access import EtcdAccess
from common.etcd.lease import bounded, etcd_client
from common.kv_store_record import MAX_BLOCKS_PER_CALL, KVStoreRecord, kv_stores_prefix, records_from_listing
from engine.async_engine import AsyncEngine
from engine.block_manager import hash_blocks, salted_root
from kv_transfer.batch import NotifySpec
from kv_transfer.checksum import block_checksum
from kv_transfer.datatypes import Ranges, TransferOp
from kv_transfer.errors import TransferError
from kv_transfer.kv_layout import KVLayout
from kv_transfer.transfer_engine import TransferEngine
from tandem.v1 import kvstore_pb2, kvstore_pb2_grpc
from worker_runtime.kv_store_policy import Backoff, ReadCost, SeenBlocks, owner
from worker_runtime.metrics import KV_STORE_BLOCKS, KV_STORE_BYTES, KV_STORE_SECONDS, KV_STORES_KNOWN

log = logging.getLogger(__name__)
T = TypeVar("T")
PutPolicy = Literal["all", "repeated"]
PUT_BATCH_BLOCKS = 64
PUT_IDLE_S = 0.05


@dataclass(frozen=True)
class KVStoreClientConfig:
    etcd: str
    cluster: str
    worker_id: str  # also the worker's transfer engine id
    access: EtcdAccess
    credentials: grpc.ChannelCredentials | None = None  # mutual TLS to the stores, when the cluster has it
    put: PutPolicy = "all"  # every block the pool frees, or only those of prompts seen more than once here
    timeout_s: float = 1.0  # the most a fetch delays a request, and a put's deadline
    poll_s: float = 2.0  # how often the stores' records are read from etcd

    def __post_init__(self) -> None:
        if self.put not in ("all", "repeated"):
            raise ValueError(f"the put policy must be all or repeated, got {self.put!r}")
        if self.timeout_s <= 0 or self.poll_s <= 0:
            raise ValueError("the store timeout and the etcd poll period must be positive")


@dataclass(frozen=True)
class _Store:
    record: KVStoreRecord
    channel: grpc.aio.Channel
    stub: kvstore_pb2_grpc.KVStoreStub


class KVStoreClient:
    def __init__(self, engine: AsyncEngine, transfer: TransferEngine, layout: KVLayout,
                 config: KVStoreClientConfig) -> None:
        tier = engine.kv_tier
        if tier is None:
            raise ValueError("the cluster KV store is reached through the worker's second tier: give the worker "
                             "--kv-offload-gib too")
        self.engine, self.transfer, self.config, self.tier = engine, transfer, config, tier
        self.namespace = layout.namespace()
        self.block_size = layout.block_size
        self.block_bytes = tier.block_bytes
        self.segment = f"{config.worker_id}.tier"
        self._stores: dict[str, _Store] = {}
        self._seen = SeenBlocks()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task[None]] = set()
        self._cost = ReadCost()
        self._backoff = Backoff()

    async def start(self) -> None:
        """Publish the tier as a segment (guarded, granting nothing: no peer writes into it), read the stores
        once, then keep them current and put blocks in the background."""
        await self.transfer.register_segment(self.segment, self.tier.memory, guarded=True)
        self.tier.collect_exports = True
        self._etcd = etcd_client(self.config.etcd, self.config.timeout_s, self.config.access)
        with contextlib.suppress(Exception):  # etcd slow or down: the loop tries again
            await self._discover()
        self._tasks = [asyncio.create_task(self._discover_loop(), name="kv-store-discovery"),
                       asyncio.create_task(self._put_loop(), name="kv-store-put")]

    async def close(self) -> None:
        self.tier.collect_exports = False
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # each call in them is bounded by timeout_s: they end
            await asyncio.wait(self._tasks, timeout=2 * self.config.timeout_s + 1)
        if self._background:  # abandon commits the cancelled puts sent, and reports: bounded too
            await asyncio.wait(list(self._background), timeout=self.config.timeout_s + 1)
        for task in self._background:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._etcd.close()
        for store_id, store in self._stores.items():
            await store.channel.close()
            KV_STORES_KNOWN.remove(self.config.worker_id, store_id)
        self._stores.clear()

    @property
    def store_ids(self) -> list[str]:
        return sorted(self._stores)

    # -- fetch ------------------------------------------------------------------------------------------
    async def fetch(self, prompt: Sequence[int], cache_salt: str = "") -> int:
        """Load into the tier the prompt's blocks that the stores hold after those held here; returns how many
        blocks were loaded (0 on any failure, which only means they will be computed)."""
        size = self.block_size
        hashes = hash_blocks(prompt[:(len(prompt) - 1) // size * size], size, salted_root(cache_salt))
        if self.config.put == "repeated":  # the last token is always computed: its block is never fetched
            self._seen.note(hashes)
        if not hashes or not self._stores or self._backoff.paused:
            return 0
        held = await self.engine.remote_kv.cached_prefix_tokens(prompt, cache_salt) // size
        stores = dict(self._stores)  # as discovery left them: it may change them while this waits
        if held >= len(hashes) or not stores:
            return 0
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                loaded = await self._fetch(stores, prompt, held, hashes[held:])
        except (TimeoutError, grpc.RpcError, TransferError, OSError) as e:
            log.debug("fetch from the KV store failed (%s): computing instead", e)
            KV_STORE_BLOCKS.labels(self.config.worker_id, "get", "failed").inc(len(hashes) - held)
            self._cost.failed(time.perf_counter() - started, len(hashes) - held)
            self._backoff.failed()  # a failing store would hold (and quarantine) tier slots at every request
            return 0
        elapsed = time.perf_counter() - started
        KV_STORE_SECONDS.labels(self.config.worker_id, "get").observe(elapsed)
        self._cost.read(elapsed, loaded)  # corrupt blocks need no pause: the stores drop them (Verify)
        return loaded

    def block_cost(self) -> float:
        """A block read from the store and then loaded from the tier into the pool, in blocks of prefill work, all
        measured here (0.0 until a fetch and a prefill were)."""
        per_block = self.engine.prefill_seconds_per_token * self.block_size
        read = self._cost.seconds_per_block
        if read is None or per_block == 0.0:
            return 0.0
        return (read + self.tier.load_seconds_per_block()) / per_block

    async def _fetch(self, stores: dict[str, _Store], prompt: Sequence[int], held: int,
                     wanted: list[int]) -> int:
        shards: dict[str, list[int]] = {}
        for block_hash in wanted:
            shards.setdefault(owner(list(stores), block_hash), []).append(block_hash)
        replies = await _all([stores[store_id].stub.Lookup(kvstore_pb2.StoreLookupRequest(
            namespace=self.namespace, engine_id=self.config.worker_id, hashes=hashes[i:i + MAX_BLOCKS_PER_CALL]))
            for store_id, hashes in shards.items() for i in range(0, len(hashes), MAX_BLOCKS_PER_CALL)])
        found = {hit.hash: (reply, hit) for reply in replies for hit in reply.hits}
        run: list[tuple[int, tuple[int, ...], kvstore_pb2.StoreLookupResponse, kvstore_pb2.StoreHit]] = []
        for block, block_hash in enumerate(wanted, start=held):
            tokens = tuple(prompt[block * self.block_size:(block + 1) * self.block_size])
            reply_hit = found.get(block_hash)
            if reply_hit is None or tuple(reply_hit[1].token_ids) != tokens:
                break
            run.append((block_hash, tokens, *reply_hit))
        KV_STORE_BLOCKS.labels(self.config.worker_id, "get", "miss").inc(len(wanted) - len(run))
        if not run:
            return 0
        slots = await self._hold([(block_hash, tokens) for block_hash, tokens, _, _ in run])
        run = run[:len(slots)]
        landed = [False] * len(run)
        try:
            await _all([self._read(reply, [(slots[i], run[i][3]) for i in idx]) for reply, idx in _by_reply(run)])
            landed = await asyncio.to_thread(lambda: [block_checksum(self._slot(slot)) == hit.checksum
                                                      for slot, (_, _, _, hit) in zip(slots, run, strict=True)])
        finally:  # a block not landed (failed, cancelled, corrupt) is never readable: computed instead; a read
            # that failed may still be writing its slots (a TCP batch past its deadline): kept from reuse meanwhile
            self.tier.finish_load([block_hash for block_hash, _, _, _ in run], landed,
                                  quarantine_s=max(30.0, 10 * self.config.timeout_s))
        corrupt = landed.count(False)
        if corrupt:
            log.warning("%d blocks read from the KV store failed their checksum: computing them", corrupt)
            bad = [(reply, hit.hash) for (_, _, reply, hit), ok in zip(run, landed, strict=True) if not ok]
            self._spawn(self._report_corrupt(stores, bad))
        leading = next((i for i, ok in enumerate(landed) if not ok), len(landed))
        KV_STORE_BLOCKS.labels(self.config.worker_id, "get", "hit").inc(leading)
        KV_STORE_BYTES.labels(self.config.worker_id, "get").inc(leading * self.block_bytes)
        KV_STORE_BLOCKS.labels(self.config.worker_id, "get", "corrupt").inc(corrupt)
        return leading

    async def _hold(self, blocks: list[tuple[int, tuple[int, ...]]]) -> list[int]:
        """Tier slots for `blocks`; if the caller is cancelled meanwhile, the slots are given back when held."""
        hold = asyncio.ensure_future(self.engine.hold_tier_loads(blocks))
        try:
            return await asyncio.shield(hold)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future[list[int]]) -> None:
                if not done.cancelled() and done.exception() is None:
                    held = done.result()
                    self.tier.finish_load([h for h, _ in blocks[:len(held)]], [False] * len(held),
                                          quarantine_s=0.0)  # nothing was read into them
            hold.add_done_callback(give_back)
            raise

    async def _read(self, reply: kvstore_pb2.StoreLookupResponse,
                    slots_hits: list[tuple[int, kvstore_pb2.StoreHit]]) -> None:
        await self.transfer.open_segment(reply.segment)
        local = np.array([slot * self.block_bytes for slot, _ in slots_hits], dtype=np.int64)
        remote = np.array([hit.offset for _, hit in slots_hits], dtype=np.int64)
        ranges = Ranges(local, remote, np.full(len(local), self.block_bytes, dtype=np.int64))
        handle = self.transfer.submit_ranges(TransferOp.READ, self.segment, reply.segment, ranges,
                                             notify=NotifySpec(tag=reply.tag), timeout_s=self.config.timeout_s)
        await handle.wait_async()

    def _slot(self, slot: int) -> torch.Tensor:
        return self.tier.memory[slot * self.block_bytes:(slot + 1) * self.block_bytes]

    # -- put --------------------------------------------------------------------------------------------
    async def _put_loop(self) -> None:
        task = asyncio.current_task()
        while task is None or not task.cancelling():
            exports = self.tier.take_exports(PUT_BATCH_BLOCKS)
            if not exports:
                await asyncio.sleep(PUT_IDLE_S)
                continue
            started = time.perf_counter()
            try:  # every shard's exchange has ended when this returns: nothing reads a slot after its unpin
                async with asyncio.timeout(self.config.timeout_s * 4):
                    await self._put(exports)
                KV_STORE_SECONDS.labels(self.config.worker_id, "put").observe(time.perf_counter() - started)
            except (TimeoutError, grpc.RpcError, TransferError, OSError) as e:
                log.debug("put into the KV store failed: %s", e)
                KV_STORE_BLOCKS.labels(self.config.worker_id, "put", "failed").inc(len(exports))
            except Exception:  # a bug here must not end the puts of a serving worker: logged, counted, go on
                log.exception("put into the KV store failed")
                KV_STORE_BLOCKS.labels(self.config.worker_id, "put", "failed").inc(len(exports))
            except asyncio.CancelledError:  # only this task's own cancellation may end the loop
                if task is None or task.cancelling():
                    raise
                KV_STORE_BLOCKS.labels(self.config.worker_id, "put", "failed").inc(len(exports))
            finally:
                self.tier.unpin([(block_hash, slot) for block_hash, slot, _ in exports])

    async def _put(self, exports: list[tuple[int, int, tuple[int, ...]]]) -> None:
        if self.config.put == "repeated":
            exports = [e for e in exports if self._seen.repeated(e[0])]
        stores = dict(self._stores)
        if not exports or not stores:
            return
        shards: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {}
        for export in exports:
            shards.setdefault(owner(list(stores), export[0]), []).append(export)
        await _all([self._put_shard(stores[store_id], blocks) for store_id, blocks in shards.items()])

    async def _put_shard(self, store: _Store, blocks: list[tuple[int, int, tuple[int, ...]]]) -> None:
        worker = self.config.worker_id
        reply = await store.stub.Reserve(kvstore_pb2.StoreReserveRequest(
            namespace=self.namespace, engine_id=worker, block_bytes=self.block_bytes,
            blocks=[kvstore_pb2.StoreBlock(hash=h, token_ids=tokens) for h, _, tokens in blocks]),
            timeout=self.config.timeout_s)
        KV_STORE_BLOCKS.labels(worker, "put", "present").inc(len(blocks) - len(reply.reserved))
        if not reply.reserved:
            return
        slot_of = {h: slot for h, slot, _ in blocks}
        slots = [slot_of[r.hash] for r in reply.reserved]
        checksums = await asyncio.to_thread(lambda: [block_checksum(self._slot(slot)) for slot in slots])
        try:
            await self.transfer.open_segment(reply.segment)
            local = np.array(slots, dtype=np.int64) * self.block_bytes
            remote = np.array([r.offset for r in reply.reserved], dtype=np.int64)
            ranges = Ranges(local, remote, np.full(len(slots), self.block_bytes, dtype=np.int64))
            await self.transfer.submit_ranges(TransferOp.WRITE, self.segment, reply.segment, ranges,
                                              notify=NotifySpec(tag=reply.tag),
                                              timeout_s=self.config.timeout_s).wait_async()
        except BaseException:  # not written (or not known to be): the store frees the slots now, not at the lapse
            self._spawn(self._commit(store, reply, checksums, written=False))
            raise
        await self._commit(store, reply, checksums, written=True)

    async def _commit(self, store: _Store, reply: kvstore_pb2.StoreReserveResponse, checksums: list[int],
                      written: bool) -> None:
        """Tell the store the reserved blocks are written (it checks each checksum over its own bytes), or
        abandoned; a commit lost on the way only leaves the reservation to lapse."""
        done = await store.stub.Commit(kvstore_pb2.StoreCommitRequest(
            namespace=self.namespace, tag=reply.tag,
            blocks=[kvstore_pb2.StoreWritten(hash=r.hash, checksum=c, abandoned=not written)
                    for r, c in zip(reply.reserved, checksums, strict=True)]), timeout=self.config.timeout_s)
        if written:
            KV_STORE_BLOCKS.labels(self.config.worker_id, "put", "stored").inc(done.accepted)
            KV_STORE_BYTES.labels(self.config.worker_id, "put").inc(done.accepted * self.block_bytes)
            KV_STORE_BLOCKS.labels(self.config.worker_id, "put", "rejected").inc(done.rejected)

    async def _report_corrupt(self, stores: dict[str, _Store], bad: list[tuple[kvstore_pb2.StoreLookupResponse,
                                                                              int]]) -> None:
        """Ask the stores to check the blocks that failed their checksum here, over their own bytes, and drop
        those that fail there too (otherwise a hot corrupt block would stay, leased and recent, for good)."""
        by_store: dict[str, list[int]] = {}
        for reply, block_hash in bad:
            store_id = next((s for s, store in stores.items() if store.record.segment == reply.segment), None)
            if store_id is not None:
                by_store.setdefault(store_id, []).append(block_hash)
        for store_id, hashes in by_store.items():
            for i in range(0, len(hashes), MAX_BLOCKS_PER_CALL):
                await stores[store_id].stub.Verify(kvstore_pb2.StoreVerifyRequest(
                    namespace=self.namespace, hashes=hashes[i:i + MAX_BLOCKS_PER_CALL]), timeout=self.config.timeout_s)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` on its own (a failure is logged at debug: it only costs a lapse or a miss)."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a KV store call in the background failed: %s", task.exception())

    # -- discovery --------------------------------------------------------------------------------------
    async def _discover_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                await self._discover()
            except Exception as e:  # etcd unreachable: keep the stores known (a dead one just fails its calls)
                log.debug("listing the KV stores failed: %s", e)

    async def _discover(self) -> None:
        records = records_from_listing(await bounded(
            self._etcd.get_prefix(kv_stores_prefix(self.config.cluster).encode()), self.config.timeout_s))
        if set(records) != set(self._stores):
            self._backoff.reset()  # another set of stores: worth asking again
        for store_id in [s for s in self._stores if self._stores[s].record != records.get(s)]:
            await self._stores.pop(store_id).channel.close()
            KV_STORES_KNOWN.remove(self.config.worker_id, store_id)
        for store_id, record in records.items():
            if store_id not in self._stores:
                channel = (grpc.aio.secure_channel(record.address, self.config.credentials)
                           if record.tls and self.config.credentials is not None
                           else grpc.aio.insecure_channel(record.address))
                self._stores[store_id] = _Store(record, channel, kvstore_pb2_grpc.KVStoreStub(channel))
                KV_STORES_KNOWN.labels(self.config.worker_id, store_id).set(1)


async def _all(awaitables: list[Awaitable[T]]) -> list[T]:
    """Like `asyncio.gather`, but returns or raises only once every awaitable has ended (gather raises at the
    first failure and leaves the others running, which may still read or write slots)."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)  # raises if this task is cancelled
    for result in results:
        if isinstance(result, asyncio.CancelledError):  # a call's channel was closed (the store left etcd)
            raise ConnectionError("a KV store call was cancelled: its store went away") from result
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def _by_reply(run: list[tuple[int, tuple[int, ...], kvstore_pb2.StoreLookupResponse, kvstore_pb2.StoreHit]]
              ) -> list[tuple[kvstore_pb2.StoreLookupResponse, list[int]]]:
    """Indexes of `run` grouped by the lookup reply (the store) each came from."""
    groups: dict[int, tuple[kvstore_pb2.StoreLookupResponse, list[int]]] = {}
    for i, (_, _, reply, _) in enumerate(run):
        groups.setdefault(id(reply), (reply, []))[1].append(i)
    return list(groups.values())
