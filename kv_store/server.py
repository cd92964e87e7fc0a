"""A KV store process: its memory (shared memory, registered as a guarded transfer segment), the KVStore gRPC
service over it, Prometheus /metrics, and its record in etcd under a lease. SIGTERM: the record is revoked
(workers stop using the store within their next look at etcd), in-flight calls get `grace_s`, then it stops.
READY fields: store id, address, metrics port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AsyncExitStack

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, start_http_server

from common.etcd.lease import LeasedKeys
from common.grpc_decoding import RejectUndecodable
from common.kv_store_record import KVStoreRecord, kv_store_key
from common.lifecycle import Lifecycle
from common.tls import bind_port
from kv_store.index import StoreIndex
from kv_store.metrics import register_store
from kv_store.servicer import KVStoreServicer
from kv_store.settings import KVStoreSettings
from tandem.v1 import kvstore_pb2_grpc
from worker_runtime.transfer import open_transfer_engine

log = logging.getLogger(__name__)
HOUSEKEEPING_PERIOD_S = 0.5


async def serve(settings: KVStoreSettings, lifecycle: Lifecycle | None = None) -> None:
    lifecycle = lifecycle or Lifecycle()
    server = grpc.aio.server(interceptors=[RejectUndecodable()])
    tls = settings.tls_files()
    address = f"{settings.host}:{settings.grpc_port}"
    port = bind_port(server, address, tls)
    store_id = settings.store_id or f"kvstore-{settings.host}-{port}"
    async with AsyncExitStack() as stack:
        transfer = await open_transfer_engine(settings, settings.etcd, settings.cluster, store_id, settings.host,
                                              settings.backends, stack)
        memory = transfer.allocate_host_buffer(settings.capacity_bytes, "kvstore")
        segment = f"{store_id}.kvstore"
        await transfer.register_segment(segment, memory, guarded=True)
        index = StoreIndex(settings.capacity_bytes, settings.reserve_ttl_s, settings.read_lease_s)
        servicer = KVStoreServicer(store_id, index, memory, transfer, segment)
        kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await server.start()
        collector = register_store(store_id, index)
        stack.callback(REGISTRY.unregister, collector)
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        stack.callback(metrics_server.shutdown)
        housekeeping = asyncio.create_task(_housekeep(servicer), name="kvstore-housekeeping")
        stack.push_async_callback(_cancel, housekeeping)
        record = KVStoreRecord(store_id=store_id, address=f"{settings.host}:{port}", segment=segment,
                               engine_id=transfer.engine_id, capacity_bytes=settings.capacity_bytes,
                               tls=tls is not None)
        keys = LeasedKeys(settings.etcd, settings.lease_ttl_s, 2.0, settings.etcd_access())
        await keys.put(kv_store_key(settings.cluster, store_id), record.to_json())
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        lifecycle.arm()
        log.info("KV store %s serving on %s (%.2f GiB), metrics on %s:%d", store_id, record.address,
                 settings.capacity_gib, settings.host, metrics_server.server_port)
        lifecycle.announce([store_id, record.address, str(metrics_server.server_port)])
        await lifecycle.stop.wait()
        log.info("draining KV store %s", store_id)
        await health_servicer.enter_graceful_shutdown()
        await keys.close()
        await server.stop(grace=settings.grace_s)


async def _housekeep(servicer: KVStoreServicer) -> None:
    while True:
        await asyncio.sleep(HOUSEKEEPING_PERIOD_S)
        servicer.housekeeping()


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
