"""The router process: tandem.v1.Inference over gRPC (with health checking and reflection) and the
OpenAI-compatible HTTP API, both on one event loop, over a live view of the workers in etcd.
With TLS settings both serve TLS and the workers are called over mutual TLS (common.tls); with
API keys both refuse calls without one (cluster.api_keys).
SIGTERM: health goes NOT_SERVING, new requests are refused, in-flight ones get `grace_s`."""

from __future__ import annotations

import asyncio
import logging
import pathlib

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.api_keys import ApiKeyInterceptor, http_middleware
from cluster.grpc_frontend import InferenceServicer
from cluster.kv_store_view import KVStoreView
from cluster.openai_frontend import OpenAIFrontend
from cluster.router_core import RouterCore
from cluster.router_settings import RouterSettings
from cluster.routing import RoutingPolicy
from cluster.worker_pool import WorkerPool
from common.grpc_decoding import RejectUndecodable
from common.lifecycle import Lifecycle
from common.tls import bind_port, channel_credentials, server_ssl_context
from engine.loader.default_model import default_model_path
from engine.tokenizer import Tokenizer
from tandem.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)


async def serve(settings: RouterSettings, lifecycle: Lifecycle | None = None) -> None:
    """Until `lifecycle.stop` (default: SIGTERM / SIGINT); READY fields: \"router\", gRPC address, HTTP URL."""
    lifecycle = lifecycle or Lifecycle()
    tokenizer = Tokenizer.from_source(pathlib.Path(settings.model) if settings.model else default_model_path())
    tls, keys = settings.tls_files(), settings.api_key_set()
    pool = WorkerPool(settings.etcd, settings.cluster, access=settings.etcd_access(),
                      credentials=None if tls is None else channel_credentials(tls))
    await pool.start()
    stores = KVStoreView(settings.etcd, settings.cluster, access=settings.etcd_access(),
                         credentials=None if tls is None else channel_credentials(tls))
    await stores.start()
    core = RouterCore(pool, tokenizer, RoutingPolicy(settings.policy, settings.kv_overlap_weight,
                                                     in_store=stores.holds),
                      settings.served_model_name, settings.max_inflight, settings.request_timeout_s,
                      settings.retry_after_s, settings.shared_prefix_cache, settings.key_limits())
    server = grpc.aio.server(interceptors=[*([] if keys is None else [ApiKeyInterceptor(keys)]), RejectUndecodable()])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(core, keys), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                                         health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    grpc_port = bind_port(server, address, tls, require_client_cert=False)
    await server.start()
    app = OpenAIFrontend(core).app()
    if keys is not None:
        app.middlewares.append(http_middleware(keys))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port,
                       ssl_context=None if tls is None else server_ssl_context(tls))
    await site.start()
    http_port = runner.addresses[0][1]
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    lifecycle.arm()
    scheme = "http" if tls is None else "https"
    log.info("router: gRPC on %s:%d, %s on %s:%d, policy %s, TLS %s, API keys %s", settings.host, grpc_port,
             scheme.upper(), settings.host, http_port, settings.policy, "on" if tls else "off",
             "off" if keys is None else f"on ({len(keys.digests)})")
    if keys is not None and tls is None:
        log.warning("API keys without TLS: keys cross the network in clear, and the workers' plaintext gRPC "
                    "can be called directly, bypassing them; give every component --tls-ca/--tls-cert/--tls-key")
    lifecycle.announce(["router", f"{settings.host}:{grpc_port}", f"{scheme}://{settings.host}:{http_port}"])
    await lifecycle.stop.wait()
    log.info("router draining")
    loop = asyncio.get_running_loop()
    await health_servicer.enter_graceful_shutdown()
    await site.stop()  # no new HTTP connections
    deadline = loop.time() + settings.grace_s
    while core.inflight and loop.time() < deadline:
        await asyncio.sleep(0.1)
    await server.stop(grace=max(deadline - loop.time(), 0.0))
    await runner.cleanup()
    await stores.stop()
    await pool.stop()
