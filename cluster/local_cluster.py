"""`tandem up` as a subprocess, for benchmarks and tests: its parsed endpoints and a clean stop."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cluster.processes import spawn, stop

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str
    address: str
    pid: int
    metrics_port: int
    node: str = ""  # on Ray: the node's id and the actor's name
    actor: str = ""


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


def fetch(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as reply:
        return reply.read().decode()


def _samples(text: str, name: str, labels: dict[str, str]) -> Iterator[float]:
    """Values of the samples of `name` in Prometheus text whose labels include `labels`."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            yield float(match.group(3))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the first matching sample (0 if none)."""
    return next(_samples(text, name, labels), 0.0)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every matching sample."""
    return sum(_samples(text, name, labels))


def worker_metrics(worker: WorkerInfo) -> str:
    return fetch(f"http://127.0.0.1:{worker.metrics_port}/metrics")


@contextmanager
def tandem_up(*args: str, timeout_s: float = 300.0, stderr: int | None = None,
              env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """`tandem up --http-port 0 --grpc-port 0 ARGS` until READY (with `env` added to the
    environment); SIGTERM and a clean exit after."""
    proc = spawn([sys.executable, "-m", "cluster.cli", "up", "--http-port", "0", "--grpc-port", "0", *args],
                 cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})})
    cluster = Cluster(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            cluster.output.append(line)
            _parse(cluster, line.split())
            if line.strip() == "READY":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout_s):
            raise RuntimeError(f"tandem up did not get ready (exit code {proc.poll()}): {''.join(cluster.output)}")
        yield cluster
    finally:
        rc = stop(proc, 60)
        reader.join(5)
    if rc != 0:
        raise RuntimeError(f"tandem up exited with {rc}")


def _parse(cluster: Cluster, parts: list[str]) -> None:
    if not parts:
        return
    if parts[0] == "etcd":
        cluster.etcd = parts[1]
    elif parts[0] == "worker":
        values = dict(p.split("=", 1) for p in parts[4:])
        cluster.workers.append(WorkerInfo(parts[1], parts[2], parts[3], int(values["pid"]), int(values["metrics"]),
                                          values.get("node", ""), values.get("actor", "")))
    elif parts[0] == "router":
        values = dict(p.split("=", 1) for p in parts[1:])
        cluster.grpc_address, cluster.http_url = values["grpc"], values["http"]
        cluster.router_pid = int(values["pid"])
