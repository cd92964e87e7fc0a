"""A cluster of simulated workers at scale on one machine: one etcd, the real router, and fleet processes
of simulated workers (`tandem worker --simulate PROFILE --replicas N`), each worker a real gRPC server
with its own etcd record. Used by bench.sim_scale and the many-worker smoke test."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from bench.scrape import fetch, metric
from common.etcd.local import EtcdServer
from common.processes import spawn, stop
from common.worker_record import workers_prefix

REPO = __file__.rsplit("/bench/", 1)[0]
# each worker keeps its record alive every TTL/3: at the default 3 s, 1000 workers send etcd ~330
# refreshes a second on top of the transfer engines' own; 10 s is etcd's usual order for a lease
LEASE_TTL_S = 10
# the TCP backend waits on its sockets; NIXL's poller checks for notifications every 2 ms when idle, which
# for 50 idle simulated workers in a process took 1.16 cores (0.21 with TCP; the pages are placeholders)
KV_BACKENDS = "tcp"


@dataclass
class SimCluster:
    etcd_server: EtcdServer
    grpc_address: str
    http_url: str
    router: subprocess.Popen
    fleet_args: tuple[str, ...]  # every fleet's flags but its role, replicas and worker id
    log_dir: str  # each fleet's stderr: <log_dir>/<name>.log
    fleets: list[subprocess.Popen] = field(default_factory=list)
    roles: dict[int, str] = field(default_factory=dict)  # fleet pid -> role
    logs: dict[int, str] = field(default_factory=dict)  # fleet pid -> its stderr's file
    workers: dict[str, list[str]] = field(default_factory=dict)  # role -> worker ids

    @property
    def etcd(self) -> str:
        return self.etcd_server.endpoint

    def router_metrics(self) -> str:
        return fetch(f"{self.http_url}/metrics")

    def seen(self, pool: str) -> float:
        """The router's workers in `pool`, from /health (small, where /metrics at a thousand workers is
        megabytes the router would render at every poll); /metrics when /health is 503 (no decode worker)."""
        try:
            return float(json.loads(fetch(f"{self.http_url}/health"))["pools"][pool])
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
        return metric(self.router_metrics(), "tandem_router_workers", pool=pool)

    def registered(self, role: str, timeout_s: float = 5.0) -> int:
        """Workers of `role` registered in etcd now (a count-only range read over etcd's JSON gateway)."""
        prefix = f"{workers_prefix('default')}{role}/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])  # the range [prefix, prefix + 1): every key under it
        body = json.dumps({"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode(),
                           "count_only": True}).encode()
        request = urllib.request.Request(f"http://{self.etcd}/v3/kv/range", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return int(json.loads(reply.read()).get("count", 0))

    def wait_until_seen(self, pool: str, count: int, timeout_s: float) -> float:
        """The moment (time.monotonic) the router's `pool` has `count` workers, polled every 20 ms."""
        deadline = time.monotonic() + timeout_s
        while (seen := self.seen(pool)) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router sees {seen:g} {pool} workers, not {count}, after {timeout_s} s")
            time.sleep(0.02)
        return time.monotonic()

    def fleets_cpu_seconds(self) -> float:
        return sum(cpu_seconds(proc.pid) for proc in self.fleets)

    def spawn_fleet(self, role: str, replicas: int, name: str) -> subprocess.Popen:
        """A fleet process of `replicas` simulated `role` workers named `name`-0, ... (see ready_fleet)."""
        path = os.path.join(self.log_dir, f"{name}.log")
        with open(path, "wb") as log:
            proc = spawn([sys.executable, "-m", "cluster.cli", "worker", "--role", role, "--etcd", self.etcd,
                          "--replicas", str(replicas), "--worker-id", name, *self.fleet_args],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        self.fleets.append(proc)
        self.roles[proc.pid] = role
        self.logs[proc.pid] = path
        return proc

    def ready_fleet(self, proc: subprocess.Popen, replicas: int, timeout_s: float) -> list[str]:
        """The worker ids of `proc`'s replicas once each has announced itself (and registered)."""
        role = self.roles[proc.pid]
        try:
            ids = [fields[0] for fields in _read_ready(proc, replicas, timeout_s, f"a {role} fleet")]
        except (RuntimeError, TimeoutError) as e:
            with open(self.logs[proc.pid], errors="replace") as log:
                raise type(e)(f"{e}; its log ends:\n{log.read()[-3000:]}") from None
        self.workers.setdefault(role, []).extend(ids)
        return ids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_ready(proc: subprocess.Popen, count: int, timeout_s: float, what: str) -> list[list[str]]:
    """The fields of `count` READY lines `proc` prints (raises if it exits or the time runs out first)."""
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()

    def read() -> None:  # every line, so the pipe never fills; "" at EOF (the process exited)
        for line in iter(stdout.readline, ""):
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    deadline, found = time.monotonic() + timeout_s, []
    while len(found) < count:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TimeoutError(f"{what}: {len(found)} of {count} READY lines in {timeout_s} s") from None
        if not line:
            raise RuntimeError(f"{what} exited (rc {proc.wait()}) after {len(found)} of {count} READY lines")
        if line.startswith("READY "):
            found.append(line.split()[1:])
    return found


@contextlib.contextmanager
def sim_cluster(profile: str, prefill: int, decode: int, per_process: int = 100, policy: str = "kv_aware",
                model: str | None = None, worker_args: tuple[str, ...] = (),
                ready_timeout_s: float = 600.0, starting_at_once: int = 0) -> Iterator[SimCluster]:
    """`prefill` + `decode` simulated workers in fleets of at most `per_process`, and the router, all of
    `model` (the profile's checkpoint; None: the default model), until exit."""
    if min(prefill, decode, starting_at_once) < 0 or per_process < 1 or prefill + decode < 1:
        raise ValueError("need prefill, decode, starting_at_once >= 0, per_process >= 1 and at least one worker")
    with tempfile.TemporaryDirectory(prefix="tandem-sim-") as data, _running(EtcdServer(data)) as etcd:
        router = spawn([sys.executable, "-m", "cluster.cli", "router", "--etcd", etcd.endpoint, "--policy", policy,
                        "--grpc-port", "0", "--http-port", "0", *(["--model", model] if model else [])],
                       cwd=REPO, stdout=subprocess.PIPE, text=True)
        cluster: SimCluster | None = None
        try:
            _, grpc_address, http_url = _read_ready(router, 1, 120, "the router")[0]
            fleet_args = ("--simulate", profile, "--lease-ttl-s", str(LEASE_TTL_S), "--kv-backends", KV_BACKENDS,
                          *(["--model", model] if model else []), *worker_args)
            cluster = SimCluster(etcd, grpc_address, http_url, router, fleet_args, data)
            planned = [(role, f"{role}-{i}", min(per_process, count - i * per_process))
                       for role, count in (("prefill", prefill), ("decode", decode))
                       for i in range(math.ceil(count / per_process))]
            wave = starting_at_once or len(planned)  # fleets starting together (all: the fastest, if etcd keeps up)
            for first in range(0, len(planned), wave):
                started = [(cluster.spawn_fleet(role, replicas, name), replicas)
                           for role, name, replicas in planned[first:first + wave]]
                deadline = time.monotonic() + ready_timeout_s  # for the whole wave
                for proc, replicas in started:
                    cluster.ready_fleet(proc, replicas, max(deadline - time.monotonic(), 0.0))
            yield cluster
        finally:
            fleets = cluster.fleets if cluster else []
            for proc in fleets:  # every fleet drains at once; each gets one SIGTERM (a second kills it)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in fleets:
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            stop(router, 30)
            if router.stdout is not None:
                router.stdout.close()


@contextlib.contextmanager
def _running(etcd: EtcdServer) -> Iterator[EtcdServer]:
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.stop()
