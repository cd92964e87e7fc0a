"""A worker process of any role: the engine behind the Worker gRPC service (with standard health
checking and reflection), Prometheus /metrics, KV events, registration in etcd, and a graceful
drain on SIGTERM. Prefill and decode workers also run a transfer engine whose KV segment is the
engine's block pool, published in etcd.

Drain order: health goes NOT_SERVING and the etcd record is revoked (routers stop sending at
once), in-flight requests get `grace_s` to finish, then the server stops.
"""

from __future__ import annotations

import logging
import pathlib
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, start_http_server

from cluster.discovery import WorkerRecord, WorkerRegistration
from cluster.grpc_decoding import RejectUndecodable
from cluster.kv_events import KVEventHub
from cluster.lifecycle import Lifecycle
from cluster.tls import channel_credentials, server_credentials
from cluster.worker_base import WorkerServicerBase
from cluster.worker_metrics import EngineCollector
from cluster.worker_settings import WorkerSettings
from decode_worker.remote_prefill import DisaggregationPolicy, RemotePrefiller
from decode_worker.servicer import DecodeWorkerServicer
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from engine.loader.default_model import default_model_path
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig
from kv_transfer.kv_connector import KVConnector
from kv_transfer.kv_push import KVPusher
from prefill_worker.servicer import PrefillWorkerServicer
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 64 << 20


def served_model_id(model: str | None) -> str:
    """The id clients name the model by: the checkpoint's folder or file name, without a GGUF
    quantization suffix ("SmolLM2-135M-Instruct.Q4_1.gguf" → "SmolLM2-135M-Instruct")."""
    path = pathlib.Path(model) if model else default_model_path()
    return re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", path.stem if path.suffix == ".gguf" else path.resolve().name,
                  flags=re.IGNORECASE)


@dataclass
class _Parts:
    engine: AsyncEngine
    servicer: WorkerServicerBase
    transfer: dict[str, str]


async def _build(settings: WorkerSettings, worker_id: str, stack: AsyncExitStack) -> _Parts:
    """The engine and the servicer of the role; the transfer engine too when disaggregated."""
    if not settings.disaggregated:
        engine = AsyncEngine(settings.engine_config())
        stack.callback(engine.shutdown)
        events = KVEventHub(engine)
        return _Parts(engine, DecodeWorkerServicer(engine, worker_id, "both", events,
                                                   max_admitted=settings.max_admitted), {})
    store = EtcdStore(settings.etcd, access=settings.etcd_access())
    stack.push_async_callback(store.close)
    transfer = TransferEngine(store, TransferEngineConfig(
        engine_id=worker_id, host=settings.host, backends=settings.backends,  # type: ignore[arg-type]
        metadata_prefix=f"/tandem/{settings.cluster}/kv"))
    stack.push_async_callback(transfer.close)
    # on CPU the pool lives in shared memory that same-host peers map; on CUDA in device memory
    storage = None if torch.cuda.is_available() else (lambda n: transfer.allocate_host_buffer(n, "kv"))
    core = LLMEngine(settings.engine_config(), kv_storage=storage)
    engine = AsyncEngine(engine=core)
    stack.callback(engine.shutdown)
    events = KVEventHub(engine)
    connector = KVConnector(transfer, core.parts.pool, core.model_config, f"{worker_id}.kv")
    await connector.publish()
    servicer: WorkerServicerBase
    if settings.role == "prefill":
        pusher = KVPusher(connector, core.config.block_size)
        core.set_kv_hook(pusher)
        servicer = PrefillWorkerServicer(engine, worker_id, events, connector, pusher, settings.max_admitted)
    else:
        tls = settings.tls_files()
        remote = RemotePrefiller(engine, connector, worker_id, settings.prefill_timeout_s,
                                 credentials=None if tls is None else channel_credentials(tls))
        stack.push_async_callback(remote.close)
        servicer = DecodeWorkerServicer(engine, worker_id, "decode", events, remote,
                                        DisaggregationPolicy(settings.min_remote_prefill_tokens),
                                        settings.max_admitted)
    return _Parts(engine, servicer, {"engine_id": transfer.engine_id, "segment": connector.segment_name})


async def serve(settings: WorkerSettings, lifecycle: Lifecycle | None = None) -> None:
    """Until `lifecycle.stop` (default: SIGTERM / SIGINT); READY fields: worker id, address, metrics port."""
    lifecycle = lifecycle or Lifecycle()
    # garbage bytes: INVALID_ARGUMENT, not UNKNOWN; a request the router's 16 MiB HTTP limit let through fits
    server = grpc.aio.server(interceptors=[RejectUndecodable()],
                             options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    tls = settings.tls_files()
    address = f"{settings.host}:{settings.grpc_port}"
    port = (server.add_insecure_port(address) if tls is None
            else server.add_secure_port(address, server_credentials(tls, require_client_cert=True)))
    worker_id = settings.worker_id or f"{settings.role}-{settings.host}-{port}"
    async with AsyncExitStack() as stack:
        parts = await _build(settings, worker_id, stack)
        worker_pb2_grpc.add_WorkerServicer_to_server(parts.servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        services = (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name, health.SERVICE_NAME,
                    reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        await server.start()
        parts.servicer.events.start()
        stack.push_async_callback(parts.servicer.events.stop)
        collector = EngineCollector(parts.engine, worker_id)
        REGISTRY.register(collector)
        stack.callback(REGISTRY.unregister, collector)
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        stack.callback(metrics_server.shutdown)
        core = parts.engine.engine
        record = WorkerRecord(worker_id=worker_id, role=settings.role, address=f"{settings.host}:{port}",
                              model=served_model_id(settings.model), max_num_seqs=core.config.max_num_seqs,
                              num_kv_blocks=core.block_manager.num_blocks, block_size=core.config.block_size,
                              max_model_len=core.max_model_len, transfer=parts.transfer, tls=tls is not None)
        registration = WorkerRegistration(settings.etcd, settings.cluster, record, ttl_s=settings.lease_ttl_s,
                                          access=settings.etcd_access())
        await registration.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        lifecycle.arm()
        log.info("worker %s (%s) serving on %s, metrics on %s:%d", worker_id, settings.role, record.address,
                 settings.host, metrics_server.server_port)
        lifecycle.announce([worker_id, record.address, str(metrics_server.server_port)])
        await lifecycle.stop.wait()
        log.info("draining %s", worker_id)
        await health_servicer.enter_graceful_shutdown()
        await registration.stop()
        await server.stop(grace=settings.grace_s)
