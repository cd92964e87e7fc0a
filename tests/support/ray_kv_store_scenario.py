"""The KV store phase of tests/test_ray_cluster.py, run inside its network namespace on the Ray cluster the
scenario (tests/support/ray_scenario.py) leaves running: `tandem up --ray --kv-store 1`, its store actor's Stats,
a SIGKILL of the store's process and Ray's restart of it, outputs against the engine's. Writes a JSON report."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from tandem.v1 import kvstore_pb2, kvstore_pb2_grpc
from tests.support.cluster import tandem_up
from tests.support.cluster_workload import Expected, Job, run_grpc
from tests.support.ray_scenario import NODE_ENV, RAY_PORT, load_jobs, wait_for
from worker_runtime.kv_store_client import KVStoreClientConfig

KV_STORE_GIB = 0.01
STATS = ("store_id", "block_bytes", "capacity_blocks", "readable_blocks", "integrity_error")


async def _stats(address: str) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await kvstore_pb2_grpc.KVStoreStub(channel).Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)
    return {name: getattr(reply, name) for name in STATS}


async def _until_store_holds(address: str, blocks: int, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (stats := await _stats(address))["readable_blocks"] < blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return stats


async def kv_store_phase(model: str, jobs: list[Job], expected: list[Expected], log: Path) -> dict[str, Any]:
    """`tandem up --ray --kv-store 1` on the scenario's Ray cluster (inside its namespace)."""
    out: dict[str, Any] = {}
    started = time.monotonic()
    with open(log, "w") as driver_stderr, tandem_up(
            "--ray", f"127.0.0.1:{RAY_PORT}", "--model", model, "--dtype", "float32", "--prefill", "1",
            "--decode", "1", "--kv-store", "1", "--kv-store-gib", str(KV_STORE_GIB), "--kv-offload-gib", "0.002",
            "--kv-backends", "tcp", "--min-remote-prefill-tokens", "4", "--grace-s", "2", timeout_s=240,
            stderr=driver_stderr.fileno(), env=NODE_ENV) as cluster:
        out["ready_s"] = time.monotonic() - started
        [store] = cluster.kv_stores
        assert cluster.router is not None
        out["store"] = asdict(store)
        out["nodes"] = sorted({w.node for w in cluster.workers} | {cluster.router.node})
        out["equal"] = [await run_grpc(cluster.grpc_address, jobs[0]) == expected[0]]
        out["stats"] = await _until_store_holds(store.address, 10)

        os.kill(store.pid, signal.SIGKILL)
        restarted = await asyncio.to_thread(
            wait_for, lambda: next((s for s in cluster.kv_stores if s.pid != store.pid), None), 120,
            "the SIGKILLed store's restart")
        out["restarted"] = asdict(restarted)
        out["restarted_at_start"] = await _stats(restarted.address)
        # the workers read the stores' records from etcd every poll_s: until then they put into the dead one
        await asyncio.sleep(2.5 * KVStoreClientConfig.poll_s)
        out["equal"].append(await run_grpc(cluster.grpc_address, jobs[1]) == expected[1])
        out["restarted_stats"] = await _until_store_holds(restarted.address, 10)
        stopping = time.monotonic()
    out["stop_s"] = time.monotonic() - stopping  # tandem_up raises unless tandem up exited 0
    out["driver_log"] = [line.strip() for line in log.read_text().splitlines() if "cluster.ray_backend.fleet" in line]
    out["seconds"] = time.monotonic() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    jobs, expected = load_jobs(json.loads(Path(args.jobs).read_text()), "kv_jobs", "kv_expected")
    log = Path(args.out).with_suffix(".log")  # the driver's stderr
    report: dict[str, Any] = {}
    try:
        report = asyncio.run(kv_store_phase(args.model, jobs, expected, log))
    except BaseException:
        report["error"] = traceback.format_exc() + (log.read_text()[-4000:] if log.exists() else "")
    Path(args.out).write_text(json.dumps(report, indent=1))
    sys.exit(1 if "error" in report else 0)


if __name__ == "__main__":
    main()
