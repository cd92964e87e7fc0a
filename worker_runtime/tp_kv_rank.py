"""The KV data plane of a tensor-parallel worker's ranks past 0 (an engine.parallel RankPlugin): each rank has its
own transfer engine (id `<worker id>.r<rank>`) and publishes its pool, of its KV heads, as segment
`<worker id>.kv.r<rank>`. A prefill rank pushes the heads it holds to the decode ranks that hold them, as rank 0
does (kv_transfer.kv_push); a decode rank grants its pages to the prefill ranks that write them. Rank 0 drives both
with the commands below, between steps (engine.parallel.leader.TPLeader.command)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.kv_hooks import KVStorageAllocator, LayerObserver
from engine.loader.engine_parts import LoadedEngineParts
from engine.parallel.protocol import FollowerStep
from engine.parallel.shard import group_kv_heads
from kv_transfer.grants import GrantKey
from kv_transfer.kv_connector import KVConnector, rank_name
from kv_transfer.kv_layout import Route
from kv_transfer.kv_push import KVPusher, PushItem
from kv_transfer.notifications import Subscription
from kv_transfer.transfer_engine import TransferEngine
from worker_runtime.settings import WorkerSettings

T = TypeVar("T")


@dataclass(frozen=True)
class RankKVSettings:
    worker: WorkerSettings
    worker_id: str


@dataclass(frozen=True)
class PushExpect:
    """Prefill: push `request_id`'s KV into `remote_blocks` of the decode group whose rank 0 is `decode_segment`."""

    request_id: str
    decode_segment: str
    remote_blocks: tuple[int, ...]
    timeout_s: float


@dataclass(frozen=True)
class PushForget:
    """Prefill: the request is done; the reply is the rank's bytes pushed for it, by decode rank ({"0": n, ...})."""

    request_id: str


@dataclass(frozen=True)
class GrantPages:
    """Decode: let each sender (source rank, its engine, its tag) whose routes end here write `blocks`."""

    request_id: str
    senders: tuple[tuple[int, str, str], ...]
    blocks: tuple[int, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class GrantEnd:
    request_id: str


def start(rank: int, settings: RankKVSettings) -> RankKV:
    """The RankPlugin entry (engine.tp_follower): before the rank builds its shard."""
    return RankKV(rank, settings)


def kv_rank_segment(worker_id: str, rank: int) -> str:
    return rank_name(f"{worker_id}.kv", rank)


class RankKV:
    def __init__(self, rank: int, settings: RankKVSettings) -> None:
        from worker_runtime.transfer import open_transfer_engine  # (that module imports this one)

        self.rank, self.settings = rank, settings
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="tp-kv", daemon=True).start()
        self._stack = AsyncExitStack()
        worker = settings.worker
        self.transfer: TransferEngine = self._run(open_transfer_engine(
            worker, worker.etcd, worker.cluster, rank_name(settings.worker_id, rank), worker.host, worker.backends,
            self._stack))
        # on CPU the pool lives in shared memory that same-host peers map (as rank 0's: worker_runtime.transfer)
        self.kv_storage: KVStorageAllocator | None = (
            None if torch.cuda.is_available() else (lambda n: self.transfer.allocate_host_buffer(n, "kv")))
        self.connector: KVConnector | None = None
        self.pusher: KVPusher | None = None
        self._grants: dict[str, tuple[list[GrantKey], list[Subscription]]] = {}
        self._lock = threading.Lock()
        self._handshakes = itertools.count()
        self._under_way: dict[str, set[int]] = {}  # a push's handshakes under way, by number
        self._forgotten_upto: dict[str, int] = {}  # ... of which those up to this one were forgotten meanwhile

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def attach(self, parts: LoadedEngineParts) -> None:
        size = self.settings.worker.tensor_parallel_size
        self.connector = KVConnector(self.transfer, parts.pool, parts.model_config,
                                     kv_rank_segment(self.settings.worker_id, self.rank), size, self.rank,
                                     weights=parts.weights_fingerprint, groups=parts.kv_groups,
                                     group_heads=group_kv_heads(parts.model_config, size))
        self._run(self.connector.publish())
        if self.settings.worker.role == "prefill":
            self.pusher = KVPusher(self.connector, parts.pool.spec.block_size)

    def handle(self, body: Any) -> Any:
        assert self.connector is not None
        if isinstance(body, PushExpect):
            # the handshakes run on this rank's loop, not in its step loop (a slow decode peer would hold back every
            # step of the group); rank 0 adds the request only once every rank answered, so no step of it comes first
            with self._lock:
                number = next(self._handshakes)
                self._under_way.setdefault(body.request_id, set()).add(number)
            return asyncio.run_coroutine_threadsafe(self._expect(body, number), self._loop)
        if isinstance(body, PushForget):
            assert self.pusher is not None
            with self._lock:  # (the push's handshakes still under way register nothing when they end)
                if body.request_id in self._under_way:
                    self._forgotten_upto[body.request_id] = max(self._under_way[body.request_id])
            return {str(dest): total for dest, total in self.pusher.forget(body.request_id).items()}
        if isinstance(body, GrantPages):
            return self._grant(body)
        if isinstance(body, GrantEnd):
            grants, subscriptions = self._grants.pop(body.request_id, ([], []))
            self.transfer.revoke(grants)
            for sub in subscriptions:  # (the batches' notes, which this rank's decode rank 0 gets relayed)
                sub.close()
            return None
        raise ValueError(f"unknown command {type(body).__name__}")

    async def _expect(self, body: PushExpect, number: int) -> None:
        """Handshake `number`: connect, then register the push unless a PushForget of it came meanwhile (a later
        PushExpect of the same request, a retry, is not forgotten by it)."""
        pusher, rid, routed = self.pusher, body.request_id, None
        try:
            assert pusher is not None and self.connector is not None, "a decode rank pushes nothing"
            routed = await self.connector.connect_routes(body.decode_segment)
        finally:
            with self._lock:  # (a PushForget either came before, and nothing is registered, or comes after and ends it)
                under_way = self._under_way[rid]
                under_way.discard(number)
                forgotten = number <= self._forgotten_upto.get(rid, -1)
                if not under_way:
                    del self._under_way[rid]
                    self._forgotten_upto.pop(rid, None)
                if pusher is not None and routed is not None and not forgotten:
                    pusher.expect(rid, routed, list(body.remote_blocks), body.timeout_s)

    def _grant(self, body: GrantPages) -> None:
        assert self.connector is not None
        grants: list[GrantKey] = []
        subscriptions: list[Subscription] = []
        try:
            for source, engine, tag in body.senders:
                if any(route.source == source and route.dest == self.rank for route in body.routes):
                    grants += self.connector.grant_blocks(engine, tag, list(body.blocks))
                    subscriptions.append(self.transfer.subscribe(tag, engine))
        except BaseException:  # none of it stays (GrantEnd would find nothing to end)
            self.transfer.revoke(grants)
            for sub in subscriptions:
                sub.close()
            raise
        self._grants[body.request_id] = (grants, subscriptions)

    def begin_step(self, step: FollowerStep) -> LayerObserver | None:
        if self.pusher is None:
            return None
        items = [PushItem(rid, (table, *groups), start, start + count)
                 for rid, (table, start, count), groups in zip(
                     step.request_ids, step.spans, step.group_tables or [()] * len(step.spans), strict=True)]
        return self.pusher.layer_written if self.pusher.begin_items(items) else None

    def end_step(self) -> None:
        if self.pusher is not None:
            self.pusher.wait_for_save()

    def close(self) -> None:
        """Close the transfer engine (its segment leaves etcd) and the store, then the loop."""
        self._run(self._stack.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
