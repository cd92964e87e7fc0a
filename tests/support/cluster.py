"""The tests' cluster harness: `tandem up` as a child process (cluster.up_process), its metrics
(bench.scrape), per-worker Status and the pool-integrity check."""

from __future__ import annotations

import asyncio
import time

import grpc

from bench.scrape import fetch, metric, metric_sum, router_metrics, worker_metrics
from cluster.up_events import WorkerUp as WorkerInfo
from cluster.up_process import REPO, tandem_up
from cluster.up_process import LocalCluster as Cluster
from common.tls import open_channel
from tandem.v1 import worker_pb2, worker_pb2_grpc

__all__ = ["REPO", "Cluster", "WorkerInfo", "assert_pools_clean", "fetch", "metric", "metric_sum", "router_metrics",
           "tandem_up", "worker_metrics", "worker_status"]


async def worker_status(worker: WorkerInfo,
                        credentials: grpc.ChannelCredentials | None = None) -> worker_pb2.WorkerStatus:
    """Its Status, over mutual TLS when given the cluster's `credentials`."""
    async with open_channel(worker.address, credentials) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)


async def assert_pools_clean(cluster: Cluster, settle_s: float = 10.0,
                             credentials: grpc.ChannelCredentials | None = None) -> None:
    """Every worker's pool is consistent and holds no block for a live request: all are free or cached."""
    deadline = time.monotonic() + settle_s
    for worker in cluster.workers:
        while True:
            status = await worker_status(worker, credentials)
            assert status.pool_integrity_ok, f"{worker.worker_id}: {status.integrity_error}"
            idle = status.running == status.waiting == 0 and status.free_blocks == status.total_blocks
            if idle or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert idle, f"{worker.worker_id} still holds blocks: {status}"
