"""The prefill role: an engine whose steps push each layer's KV to the decode worker that reserved
the blocks (kv_transfer.kv_push.KVPusher), behind PrefillWorkerServicer."""

from __future__ import annotations

from contextlib import AsyncExitStack

from kv_transfer.kv_push import KVPusher
from prefill_worker.servicer import PrefillWorkerServicer
from worker_runtime.kv_events import KVEventHub
from worker_runtime.server import WorkerParts
from worker_runtime.settings import WorkerSettings
from worker_runtime.transfer import engine_with_kv_connector, record_transfer_fields, start_kv_store_client


async def build(settings: WorkerSettings, worker_id: str, stack: AsyncExitStack) -> WorkerParts:
    if settings.role != "prefill":
        raise ValueError(f"the prefill worker serves role 'prefill', not {settings.role!r}")
    engine, connector = await engine_with_kv_connector(settings, worker_id, stack)
    pusher = KVPusher(connector, engine.config.block_size)
    await engine.set_kv_hook(pusher)
    store = await start_kv_store_client(settings, engine, connector, stack)
    events = KVEventHub(engine, store_block_cost=None if store is None else store.block_cost)
    servicer = PrefillWorkerServicer(engine, worker_id, events, connector, pusher, settings.max_admitted, store)
    return WorkerParts(engine, servicer, record_transfer_fields(connector))
