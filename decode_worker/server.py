"""The decode role (prefills remotely when it pays: decode_worker.remote_prefill) and the aggregated
role "both" (always prefills locally, no transfer engine), behind DecodeWorkerServicer."""

from __future__ import annotations

from contextlib import AsyncExitStack

from common.tls import channel_credentials
from decode_worker.remote_prefill import DisaggregationPolicy, RemotePrefiller
from decode_worker.servicer import DecodeWorkerServicer
from engine.async_engine import AsyncEngine
from worker_runtime.kv_events import KVEventHub
from worker_runtime.server import WorkerParts
from worker_runtime.settings import WorkerSettings
from worker_runtime.transfer import engine_with_kv_connector, record_transfer_fields, start_kv_store_client


async def build(settings: WorkerSettings, worker_id: str, stack: AsyncExitStack) -> WorkerParts:
    if settings.role == "both":
        engine = AsyncEngine(settings.engine_config())
        stack.callback(engine.shutdown)
        return WorkerParts(engine, DecodeWorkerServicer(engine, worker_id, "both", KVEventHub(engine),
                                                        max_admitted=settings.max_admitted))
    if settings.role != "decode":
        raise ValueError(f"the decode worker serves roles 'decode' and 'both', not {settings.role!r}")
    engine, connector = await engine_with_kv_connector(settings, worker_id, stack)
    store = await start_kv_store_client(settings, engine, connector, stack)
    tls = settings.tls_files()
    remote = RemotePrefiller(engine, connector, worker_id, settings.prefill_timeout_s,
                             credentials=None if tls is None else channel_credentials(tls))
    stack.push_async_callback(remote.close)
    events = KVEventHub(engine, store_block_cost=None if store is None else store.block_cost)
    servicer = DecodeWorkerServicer(engine, worker_id, "decode", events, remote,
                                    DisaggregationPolicy(settings.min_remote_prefill_tokens), settings.max_admitted,
                                    store)
    return WorkerParts(engine, servicer, record_transfer_fields(connector))
