"""The KV data plane of a disaggregated worker (either role): a transfer engine whose metadata lives
in etcd, and the engine's KV pool published through it as a segment (kv_transfer.kv_connector)."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import torch

from engine.async_engine import AsyncEngine
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig
from kv_transfer.kv_connector import KVConnector
from kv_transfer.link_tls import LinkTls
from worker_runtime.settings import WorkerSettings

log = logging.getLogger(__name__)


async def engine_with_kv_connector(settings: WorkerSettings, worker_id: str,
                                   stack: AsyncExitStack) -> tuple[AsyncEngine, KVConnector]:
    """The engine, its pool registered as segment `<worker id>.kv` and its layout published."""
    tls = settings.tls_files()
    if tls is None and settings.kv_secret is None:
        log.warning("the KV transfer links are not authenticated: anyone who reads this worker's segment "
                    "address in etcd can write into its KV pool over TCP; give every worker the cluster's "
                    "--tls-* files or TANDEM_KV_SECRET (NIXL/UCX is not covered either way: it trusts its fabric)")
    elif tls is not None:
        log.info("KV links are mutual TLS (the cluster's --tls-* files): control, TCP-backend pages and NCCL "
                 "headers are encrypted; shared memory, NIXL/UCX and the NCCL payload are outside the links")
    elif settings.kv_link_integrity == "frames":
        log.info("KV links seal frames only (--kv-link-integrity frames): page bytes are not sealed")
    store = EtcdStore(settings.etcd, access=settings.etcd_access())
    stack.push_async_callback(store.close)
    transfer = TransferEngine(store, TransferEngineConfig(
        engine_id=worker_id, host=settings.host, backends=settings.backends,  # type: ignore[arg-type]
        metadata_prefix=f"/tandem/{settings.cluster}/kv", link_secret=settings.kv_link_secret(),
        seal_payloads=settings.kv_link_integrity == "all",
        link_tls=None if tls is None else LinkTls(tls.ca, tls.cert, tls.key)))
    stack.push_async_callback(transfer.close)
    # on CPU the pool lives in shared memory that same-host peers map; on CUDA in device memory
    storage = None if torch.cuda.is_available() else (lambda n: transfer.allocate_host_buffer(n, "kv"))
    engine = AsyncEngine(settings.engine_config(), kv_storage=storage)
    stack.callback(engine.shutdown)
    connector = KVConnector(transfer, engine.kv_pool, engine.model_config, kv_segment_name(worker_id),
                            weights=engine.weights_fingerprint)
    await connector.publish()
    return engine, connector


def kv_segment_name(worker_id: str) -> str:
    """The KV pool segment a worker publishes (its transfer engine id is the worker id)."""
    return f"{worker_id}.kv"


def record_transfer_fields(connector: KVConnector) -> dict[str, str]:
    """What routers and peers read from the worker's etcd record to reach its KV segment."""
    return {"engine_id": connector.transfer.engine_id, "segment": connector.segment_name}
