"""A worker process of any role: the engine behind the Worker gRPC service (with standard health
checking and reflection), Prometheus /metrics, KV events, registration in etcd, and a graceful
drain on SIGTERM. What differs between roles is the `RoleBuilder` (prefill_worker.server,
decode_worker.server): it makes the engine and the role's servicer.

Drain order: health goes NOT_SERVING and the etcd record is revoked (routers stop sending at
once), in-flight requests get `grace_s` to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import re
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from common.grpc_decoding import RejectUndecodable
from common.lifecycle import Lifecycle
from common.tls import bind_port
from common.wire import MAX_WORKER_MESSAGE_BYTES
from common.worker_record import WorkerRecord, WorkerRegistration
from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError
from engine.loader.default_model import default_model_path
from tandem.v1 import worker_pb2, worker_pb2_grpc
from worker_runtime.metrics import ENGINES
from worker_runtime.servicer_base import WorkerServicerBase
from worker_runtime.settings import WorkerSettings

log = logging.getLogger(__name__)


def served_model_id(model: str | None) -> str:
    """The id clients name the model by: the checkpoint's folder or file name, without a GGUF
    quantization suffix ("SmolLM2-135M-Instruct.Q4_1.gguf" → "SmolLM2-135M-Instruct")."""
    path = pathlib.Path(model) if model else default_model_path()
    return re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", path.stem if path.suffix == ".gguf" else path.resolve().name,
                  flags=re.IGNORECASE)


@dataclass
class WorkerParts:
    """What a role builds: its engine, its servicer, and the transfer fields of its etcd record."""

    engine: AsyncEngine
    servicer: WorkerServicerBase
    transfer: dict[str, str] = field(default_factory=dict)


# (settings, worker id, exit stack for clean-ups) → the role's parts
RoleBuilder = Callable[[WorkerSettings, str, AsyncExitStack], Awaitable[WorkerParts]]


async def serve(settings: WorkerSettings, build: RoleBuilder, lifecycle: Lifecycle | None = None) -> None:
    """Until `lifecycle.stop` (default: SIGTERM / SIGINT); READY fields: worker id, address, metrics port."""
    lifecycle = lifecycle or Lifecycle()
    # garbage bytes: INVALID_ARGUMENT, not UNKNOWN
    server = grpc.aio.server(interceptors=[RejectUndecodable()],
                             options=[("grpc.max_receive_message_length", MAX_WORKER_MESSAGE_BYTES)])
    tls = settings.tls_files()
    address = f"{settings.host}:{settings.grpc_port}"
    port = bind_port(server, address, tls)
    worker_id = settings.worker_id or f"{settings.role}-{settings.host}-{port}"
    lost: list[str] = []  # a tensor-parallel rank that exited: the worker drains and deregisters, then fails
    async with AsyncExitStack() as stack:
        parts = await build(settings, worker_id, stack)
        loop = asyncio.get_running_loop()

        def rank_lost(why: str) -> None:
            lost.append(why)
            loop.call_soon_threadsafe(lifecycle.stop.set)

        parts.engine.on_rank_lost(rank_lost)
        worker_pb2_grpc.add_WorkerServicer_to_server(parts.servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        services = (worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name, health.SERVICE_NAME,
                    reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        await server.start()
        parts.servicer.events.start()
        stack.push_async_callback(parts.servicer.events.stop)
        ENGINES.add(parts.engine, worker_id)
        stack.callback(ENGINES.remove, parts.engine, worker_id)
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        stack.callback(metrics_server.shutdown)
        engine = parts.engine
        record = WorkerRecord(worker_id=worker_id, role=settings.role, address=f"{settings.host}:{port}",
                              model=served_model_id(settings.model), max_num_seqs=engine.config.max_num_seqs,
                              num_kv_blocks=engine.stats().total_blocks, block_size=engine.config.block_size,
                              max_model_len=engine.max_model_len, transfer=parts.transfer, tls=tls is not None,
                              tensor_parallel_size=engine.config.tensor_parallel_size)
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
    if lost:
        raise EngineDeadError(f"worker {worker_id} stopped: tensor-parallel {lost[0]}")
