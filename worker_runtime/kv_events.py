"""KV events: a worker tells routers which block hashes its prefix cache holds.

Each subscriber first gets a snapshot (`cleared` + every cached hash), then the changes, in the
order the engine made them. Snapshot and changes are read together on the engine thread, so a
subscriber's view is exact as of each batch it received."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from engine.async_engine import AsyncEngine
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)


class KVEventHub:
    def __init__(self, engine: AsyncEngine, interval_s: float = 0.05,
                 store_block_cost: Callable[[], float] | None = None) -> None:
        """`store_block_cost`: the cluster KV store client's measured cost of a block (KVStoreClient.block_cost)."""
        self.engine = engine
        self.store_block_cost = store_block_cost or (lambda: 0.0)
        self.interval_s = interval_s
        self._subscribers: list[asyncio.Queue[worker_pb2.KVEventBatch]] = []
        self._joining: list[asyncio.Queue[worker_pb2.KVEventBatch]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a subscriber joined, or the engine has changes
        if not engine.config.record_kv_events:
            raise ValueError("KV events need an engine with record_kv_events=True")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kv-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def subscribe(self) -> AsyncIterator[worker_pb2.KVEventBatch]:
        queue: asyncio.Queue[worker_pb2.KVEventBatch] = asyncio.Queue()
        self._joining.append(queue)
        self._wake.set()
        try:
            while True:
                yield await queue.get()
        finally:
            for group in (self._joining, self._subscribers):
                if queue in group:
                    group.remove(queue)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)  # changes are sent at most once per interval, batched
            # a subscriber may leave while the engine answers: only those still joining after it are admitted
            wanted = bool(self._joining)
            if not wanted and not self.engine.has_kv_events():  # idle: asleep until a change or a subscriber
                self._wake.clear()
                self.engine.notify_kv_events(self._wake)
                await self._wake.wait()
                continue
            try:
                events = await self.engine.drain_kv_events(with_snapshot=wanted)
            except Exception:
                log.exception("could not read KV events; retrying")
                continue
            joining = [q for q in self._joining if wanted]
            self._joining = [q for q in self._joining if q not in joining]
            if events.stored or events.removed or events.offloaded or events.unoffloaded:
                batch = worker_pb2.KVEventBatch(stored_block_hashes=events.stored,
                                                removed_block_hashes=events.removed,
                                                offloaded_block_hashes=events.offloaded,
                                                unoffloaded_block_hashes=events.unoffloaded,
                                                offload_block_cost=events.offload_block_cost,
                                                store_block_cost=self.store_block_cost())
                for queue in self._subscribers:
                    queue.put_nowait(batch)
            if joining:
                first = worker_pb2.KVEventBatch(stored_block_hashes=events.snapshot or (), cleared=True,
                                                offloaded_block_hashes=events.offload_snapshot or (),
                                                offload_block_cost=events.offload_block_cost,
                                                store_block_cost=self.store_block_cost())
                for queue in joining:
                    queue.put_nowait(first)
                self._subscribers.extend(joining)

