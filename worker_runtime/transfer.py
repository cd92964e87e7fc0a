"""The KV data plane of a disaggregated worker (either role): a transfer engine whose metadata lives
in etcd, and the engine's KV pool published through it as a segment (kv_transfer.kv_connector)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack

import torch

from common.security import SecuritySettings
from common.tls import channel_credentials
from engine.async_engine import AsyncEngine
from engine.parallel.protocol import RankPlugin
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig
from kv_transfer.kv_connector import KVConnector
from kv_transfer.kv_layout import Route
from kv_transfer.link_tls import LinkTls
from worker_runtime.kv_store_client import KVStoreClient, KVStoreClientConfig
from worker_runtime.settings import WorkerSettings
from worker_runtime.tp_kv_rank import GrantEnd, GrantPages, RankKVSettings

log = logging.getLogger(__name__)


async def engine_with_kv_connector(settings: WorkerSettings, worker_id: str,
                                   stack: AsyncExitStack) -> tuple[AsyncEngine, KVConnector]:
    """The engine, its pool registered as segment `<worker id>.kv` and its layout published. A tensor-parallel
    worker's other ranks publish theirs as `<worker id>.kv.r<rank>` (worker_runtime.tp_kv_rank)."""
    transfer = await open_transfer_engine(settings, settings.etcd, settings.cluster, worker_id, settings.host,
                                          settings.backends, stack)
    # on CPU the pool lives in shared memory that same-host peers map; on CUDA in device memory
    storage = None if torch.cuda.is_available() else (lambda n: transfer.allocate_host_buffer(n, "kv"))
    size = settings.tensor_parallel_size
    plugin = None if size == 1 else RankPlugin("worker_runtime.tp_kv_rank", RankKVSettings(settings, worker_id))
    engine = AsyncEngine(settings.engine_config(), kv_storage=storage, rank_plugin=plugin)
    stack.callback(engine.shutdown)
    connector = KVConnector(transfer, engine.kv_pool, engine.model_config, kv_segment_name(worker_id), size, 0,
                            weights=engine.weights_fingerprint, groups=engine.kv_groups,
                            group_heads=engine.tensor_parallel_group_heads if size > 1 else ())
    await connector.publish()
    if size > 1:
        async def rank_grants(request_id: str, senders: list[tuple[int, str, str]], blocks: list[int],
                              found: tuple[Route, ...]) -> Callable[[], object]:
            try:
                await engine.rank_command(GrantPages(request_id, tuple(senders), tuple(blocks), found))
            except BaseException:  # (the ranks that granted end it too)
                engine.send_rank_command(GrantEnd(request_id))
                raise
            return lambda: engine.send_rank_command(GrantEnd(request_id))

        connector.rank_grants = rank_grants
    return engine, connector


async def open_transfer_engine(security: SecuritySettings, etcd: str, cluster: str, engine_id: str, host: str,
                               backends: tuple[str, ...], stack: AsyncExitStack) -> TransferEngine:
    """A transfer engine (closed by `stack`) whose segment descriptors live in the cluster's etcd, its links
    secured as `security` says (a worker's and a KV store's alike)."""
    tls = security.tls_files()
    if tls is None and security.kv_secret is None:
        log.warning("the KV transfer links are not authenticated: anyone who reads this process's segment "
                    "address in etcd can write into its KV memory over TCP; give every member the cluster's "
                    "--tls-* files or TANDEM_KV_SECRET (NIXL/UCX is not covered either way: it trusts its fabric)")
    elif tls is not None:
        log.info("KV links are mutual TLS (the cluster's --tls-* files): control, TCP-backend pages and NCCL "
                 "headers are encrypted; shared memory, NIXL/UCX and the NCCL payload are outside the links")
    elif security.kv_link_integrity == "frames":
        log.info("KV links seal frames only (--kv-link-integrity frames): page bytes are not sealed")
    store = EtcdStore(etcd, access=security.etcd_access())
    stack.push_async_callback(store.close)
    transfer = TransferEngine(store, TransferEngineConfig(
        engine_id=engine_id, host=host, backends=backends,  # type: ignore[arg-type]
        metadata_prefix=f"/tandem/{cluster}/kv", link_secret=security.kv_link_secret(),
        seal_payloads=security.kv_link_integrity == "all",
        link_tls=None if tls is None else LinkTls(tls.ca, tls.cert, tls.key)))
    stack.push_async_callback(transfer.close)
    return transfer


async def start_kv_store_client(settings: WorkerSettings, engine: AsyncEngine, connector: KVConnector,
                                stack: AsyncExitStack) -> KVStoreClient | None:
    """The worker's client of the cluster KV store (closed by `stack`), with --use-kv-store; None without."""
    if not settings.use_kv_store:
        return None
    tls = settings.tls_files()
    client = KVStoreClient(engine, connector.transfer, connector.layout, KVStoreClientConfig(
        etcd=settings.etcd, cluster=settings.cluster, worker_id=connector.transfer.engine_id,
        access=settings.etcd_access(), credentials=None if tls is None else channel_credentials(tls),
        put=settings.kv_store_put, timeout_s=settings.kv_store_timeout_s))
    await client.start()
    stack.push_async_callback(client.close)
    log.info("KV store client on: %d stores found", len(client.store_ids))
    return client


def kv_segment_name(worker_id: str) -> str:
    """The KV pool segment a worker publishes (its transfer engine id is the worker id)."""
    return f"{worker_id}.kv"


def record_transfer_fields(connector: KVConnector) -> dict[str, str]:
    """What routers and peers read from the worker's etcd record to reach its KV segment."""
    return {"engine_id": connector.transfer.engine_id, "segment": connector.segment_name}
