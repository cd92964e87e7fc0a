"""`tandem up` as a child process, for programs that need a whole local cluster for a while (the
README's demo, bench.serve, the tests): its endpoints as typed events (cluster.up_events, read from
`--output-format json`), and a clean stop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cluster.up_events import ClusterReady, EtcdUp, KVStoreUp, PlannerUp, RouterUp, UpEvent, WorkerUp, from_json
from common.processes import spawn, stop
from common.settings import child_environment

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LocalCluster:
    """What `tandem up` announced so far; `workers` grows as the planner or Ray adds some."""

    proc: subprocess.Popen
    etcd: str = ""
    router: RouterUp | None = None
    planner: PlannerUp | None = None
    workers: list[WorkerUp] = field(default_factory=list)
    kv_stores: list[KVStoreUp] = field(default_factory=list)
    output: list[str] = field(default_factory=list)  # every line it printed

    @property
    def grpc_address(self) -> str:
        assert self.router is not None, "the router has not started"
        return self.router.grpc_address

    @property
    def http_url(self) -> str:
        assert self.router is not None, "the router has not started"
        return self.router.http_url

    @property
    def router_pid(self) -> int:
        assert self.router is not None, "the router has not started"
        return self.router.pid

    def role(self, role: str) -> list[WorkerUp]:
        return [w for w in self.workers if w.role == role]

    def apply(self, event: UpEvent) -> None:
        if isinstance(event, EtcdUp):
            self.etcd = event.endpoint
        elif isinstance(event, WorkerUp):
            self.workers.append(event)
        elif isinstance(event, KVStoreUp):
            self.kv_stores.append(event)
        elif isinstance(event, RouterUp):
            self.router = event
        elif isinstance(event, PlannerUp):
            self.planner = event


@contextmanager
def tandem_up(*args: str, timeout_s: float = 300.0, stderr: int | None = None,
              env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """`tandem up --http-port 0 --grpc-port 0 ARGS --output-format json` until its READY event (with
    `env` added to the environment); SIGTERM and a clean exit after (RuntimeError otherwise)."""
    proc = spawn([sys.executable, "-m", "cluster.cli", "up", "--http-port", "0", "--grpc-port", "0", *args,
                  "--output-format", "json"], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                 env=child_environment(env))
    cluster = LocalCluster(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            cluster.output.append(line)
            try:
                event = from_json(line)
            except ValueError:
                continue  # not an event (a child's stray print)
            cluster.apply(event)
            if isinstance(event, ClusterReady):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):  # (a tandem up that exited never gets ready: no need to wait out the deadline)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem up did not get ready (exit code {proc.poll()}): {''.join(cluster.output)}")
        yield cluster
    finally:
        rc = stop(proc, 60)
        reader.join(5)
    if rc != 0:
        raise RuntimeError(f"tandem up exited with {rc}")
