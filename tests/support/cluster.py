"""A `tandem up` cluster as a subprocess, for tests: its parsed endpoints, per-worker Status and
/metrics, and clean teardown."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cluster.processes import spawn
from tandem.v1 import worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str
    address: str
    pid: int
    metrics_port: int


@dataclass
class Cluster:
    proc: subprocess.Popen
    etcd: str = ""
    grpc_address: str = ""
    http_url: str = ""
    router_pid: int = 0
    workers: list[WorkerInfo] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def role(self, role: str) -> list[WorkerInfo]:
        return [w for w in self.workers if w.role == role]

    def router_metrics(self) -> str:
        return fetch(f"{self.http_url}/metrics")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


def worker_metrics(worker: WorkerInfo) -> str:
    return fetch(f"http://127.0.0.1:{worker.metrics_port}/metrics")


async def worker_status(worker: WorkerInfo) -> worker_pb2.WorkerStatus:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)


async def assert_pools_clean(cluster: Cluster, settle_s: float = 10.0) -> None:
    """Every worker's pool is consistent and holds no block for a live request: all are free or cached."""
    import asyncio
    deadline = time.monotonic() + settle_s
    for worker in cluster.workers:
        while True:
            status = await worker_status(worker)
            assert status.pool_integrity_ok, f"{worker.worker_id}: {status.integrity_error}"
            idle = status.running == status.waiting == 0 and status.free_blocks == status.total_blocks
            if idle or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert idle, f"{worker.worker_id} still holds blocks: {status}"


@contextmanager
def tandem_up(*args: str, timeout_s: float = 300.0) -> Iterator[Cluster]:
    """`tandem up --http-port 0 --grpc-port 0 ARGS` until READY; SIGTERM and a clean exit after."""
    proc = spawn([sys.executable, "-m", "cluster.cli", "up", "--http-port", "0", "--grpc-port", "0", *args],
                 cwd=REPO, stdout=subprocess.PIPE, text=True)
    cluster = Cluster(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            cluster.output.append(line)
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "etcd":
                cluster.etcd = parts[1]
            elif parts[0] == "worker":
                values = dict(p.split("=", 1) for p in parts[4:])
                cluster.workers.append(WorkerInfo(parts[1], parts[2], parts[3], int(values["pid"]),
                                                  int(values["metrics"])))
            elif parts[0] == "router":
                values = dict(p.split("=", 1) for p in parts[1:])
                cluster.grpc_address, cluster.http_url = values["grpc"], values["http"]
                cluster.router_pid = int(values["pid"])
            elif parts[0] == "READY":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout_s):
            raise RuntimeError(f"tandem up did not get ready (exit code {proc.poll()}): {''.join(cluster.output)}")
        yield cluster
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(5)
    assert rc == 0, f"tandem up exited with {rc}"
