"""A worker process: the engine behind the Worker gRPC service (with standard health checking and
reflection), Prometheus metrics, registration in etcd, and a graceful drain on SIGTERM.

Drain order: health goes NOT_SERVING and the etcd record is revoked (routers stop sending at
once), in-flight requests get `grace_s` to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.discovery import WorkerRecord, WorkerRegistration, WorkerRole
from decode_worker.servicer import DecodeWorkerServicer
from engine import EngineConfig
from engine.async_engine import AsyncEngine
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    etcd: str
    cluster: str = "default"
    role: WorkerRole = "both"
    worker_id: str = ""
    model: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int = 0
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    grace_s: float = 30.0
    lease_ttl_s: int = 3

    def __post_init__(self) -> None:
        if self.role not in ("decode", "both"):
            raise ValueError(f"this server runs decode or aggregated workers, not {self.role!r}")
        if self.grace_s < 0 or self.lease_ttl_s < 2:
            raise ValueError("grace_s must be >= 0 and lease_ttl_s >= 2")


class EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: AsyncEngine, worker_id: str) -> None:
        self.engine, self.worker_id = engine, worker_id

    def collect(self) -> Iterator[GaugeMetricFamily]:
        core = self.engine.engine
        for name, doc, value in (
                ("tandem_running_sequences", "Sequences in the running batch", len(core.scheduler.running)),
                ("tandem_waiting_sequences", "Sequences waiting to be scheduled", len(core.scheduler.waiting)),
                ("tandem_kv_cache_usage_ratio", "Share of KV blocks in use", core.block_manager.usage())):
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            family.add_metric([self.worker_id], value)
            yield family


async def serve(settings: WorkerSettings, ready: asyncio.Event | None = None) -> None:
    engine = AsyncEngine(EngineConfig(model=settings.model, num_kv_blocks=settings.num_kv_blocks,
                                      max_num_seqs=settings.max_num_seqs))
    worker_id = settings.worker_id or f"{settings.role}-{settings.host}-{settings.grpc_port}"
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(DecodeWorkerServicer(engine, worker_id, settings.role), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name, health.SERVICE_NAME,
                reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await server.start()
    collector = EngineCollector(engine, worker_id)
    REGISTRY.register(collector)
    metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
    cfg = engine.engine.config
    record = WorkerRecord(worker_id=worker_id, role=settings.role, address=f"{settings.host}:{port}",
                          model=engine.engine.model_config.name, max_num_seqs=cfg.max_num_seqs,
                          num_kv_blocks=engine.engine.block_manager.num_blocks, block_size=cfg.block_size)
    registration = WorkerRegistration(settings.etcd, settings.cluster, record, ttl_s=settings.lease_ttl_s)
    await registration.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s (%s) serving on %s, metrics on %s:%d", worker_id, settings.role, record.address,
             settings.host, metrics_server.server_port)
    print(f"READY {worker_id} {record.address} {metrics_server.server_port}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("draining %s", worker_id)
    await health_servicer.enter_graceful_shutdown()
    await registration.stop()
    await server.stop(grace=settings.grace_s)
    metrics_server.shutdown()
    REGISTRY.unregister(collector)
    engine.shutdown()

