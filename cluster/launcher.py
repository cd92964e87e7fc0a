"""`tandem up`: a whole local cluster as separate OS processes — etcd (unless one is given), the
workers, the router — until Ctrl-C / SIGTERM, which stops them all (router first, so no request
is sent to a worker that is already gone).

Output: one event per line (cluster.up_events), as text or, with --output-format json, as JSON objects
for programs (cluster.up_process reads them).

With --planner true the SLO planner (cluster/planner) sizes the prefill and decode pools: it starts
workers, and stops them with SIGTERM, which drains them. With --ray the same cluster runs as Ray
actors instead (cluster/ray_backend/launcher.py).

Every child gets the security settings (common.security): file paths as flags, secrets
(etcd password, API keys) as TANDEM_* variables, never in argv.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from cluster.planner.local_actuator import LocalProcessActuator
from cluster.planner.loop import PlannerLoop, observation_source
from cluster.planner.settings import PlannerSettings, Pool
from cluster.up_events import (
    Announcer,
    ClusterReady,
    EtcdUp,
    KVStoreUp,
    PlannerUp,
    RouterUp,
    WorkerUp,
)
from cluster.up_settings import UpSettings
from common.etcd.local import running_etcd
from common.processes import spawn
from common.settings import child_environment

log = logging.getLogger(__name__)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    ready: list[str] = field(default_factory=list)


def _start(name: str, args: list[str], env: dict[str, str]) -> _Child:
    # its own process group: a terminal's Ctrl-C reaches only the launcher, which stops the children in order
    proc = spawn([sys.executable, "-m", "cluster.cli", *args], stdout=subprocess.PIPE, text=True, process_group=0,
                 env=child_environment(env))
    return _Child(name, proc)


def _await_ready(children: list[_Child], timeout_s: float) -> None:
    """Every child printed its READY line; raises if one exited or the time ran out."""
    def read(child: _Child) -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            if line.startswith("READY "):
                child.ready = line.split()[1:]
                return
    threads = [threading.Thread(target=read, args=(c,), daemon=True) for c in children]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for child, thread in zip(children, threads, strict=True):
        thread.join(max(deadline - time.monotonic(), 0.0))
        if not child.ready:
            raise RuntimeError(f"{child.name} did not start (exit code {child.proc.poll()}); see its log above")


def await_workers(http_url: str, count: int, timeout_s: float, context: ssl.SSLContext | None,
                  stop: threading.Event | None = None) -> None:
    """The router's /health counts `count` workers; raises RuntimeError past `timeout_s` or once `stop` is set."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise RuntimeError("stopped while waiting for the workers")
        with contextlib.suppress(OSError, ValueError), \
                urllib.request.urlopen(f"{http_url}/health", timeout=2, context=context) as reply:
            if json.load(reply).get("workers") == count:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the router did not see all {count} workers within {timeout_s} s")


def _stop(children: list[_Child], grace_s: float) -> None:
    for child in children:  # router first: it stops taking requests before the workers go
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(grace_s + 5)
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


@contextlib.contextmanager
def etcd_endpoint(endpoint: str, host: str = "127.0.0.1") -> Iterator[str]:
    """`endpoint`, or else a local etcd listening on `host`, stopped after."""
    if endpoint:
        yield endpoint
    else:
        with running_etcd(host) as started:
            yield started


def _local_planner(settings: UpSettings, planner: PlannerSettings, etcd: str, workers: list[_Child],
                   roles: list[str], http_url: str, announce_event: Announcer
                   ) -> tuple[PlannerLoop, LocalProcessActuator]:
    """The planner over this launcher's workers; it announces each worker it starts."""
    def start(pool: Pool) -> subprocess.Popen:
        return _start(f"{pool} worker", settings.worker_args(pool, etcd), settings.security_env()).proc

    def announce(pool: Pool, proc: subprocess.Popen, ready: list[str]) -> None:
        announce_event(WorkerUp.from_ready(ready, pool, proc.pid))
    actuator = LocalProcessActuator(start, announce)
    for child, role in zip(workers, roles, strict=True):
        actuator.adopt("prefill" if role == "prefill" else "decode", child.proc)
    loop = PlannerLoop(planner, observation_source(planner, f"{http_url}/metrics", settings.https_context()),
                       actuator)
    announce_event(PlannerUp(loop.metrics.serve(planner.planner_metrics_port, settings.host)))
    return loop, actuator


def up(settings: UpSettings, planner: PlannerSettings | None = None) -> int:
    """`planner`: run the SLO planner over the prefill and decode pools (settings.planner)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    announce = Announcer(settings.output_format)
    with etcd_endpoint(settings.etcd) as etcd:
        announce(EtcdUp(etcd))
        roles = ["prefill"] * settings.prefill + ["decode"] * settings.decode + ["both"] * settings.both
        workers = [_start(f"{role} worker {i}", settings.worker_args(role, etcd), settings.security_env())
                   for i, role in enumerate(roles)]
        stores = [_start(f"KV store {i}", settings.kv_store_args(etcd), settings.security_env())
                  for i in range(settings.kv_store)]
        router = _start("router", settings.router_args(etcd), settings.router_env())
        children = [router, *workers, *stores]
        scaled: LocalProcessActuator | None = None
        try:
            _await_ready([*stores, *workers, router], settings.start_timeout_s)
            for child in stores:
                announce(KVStoreUp.from_ready(child.ready, child.proc.pid))
            for child, role in zip(workers, roles, strict=True):
                announce(WorkerUp.from_ready(child.ready, role, child.proc.pid))
            router_up = RouterUp.from_ready(router.ready, router.proc.pid)
            announce(router_up)
            http_url = router_up.http_url
            await_workers(http_url, len(workers), settings.start_timeout_s, settings.https_context())
            loop, scaled = (None, None) if planner is None else _local_planner(settings, planner, etcd, workers,
                                                                                roles, http_url, announce)
            announce(ClusterReady())
            print(f"OpenAI API: {http_url}/v1 (model list at {http_url}/v1/models); Ctrl-C stops the cluster",
                  file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                if router.proc.poll() is not None:
                    raise RuntimeError(f"the router exited (code {router.proc.returncode})")
                if loop is not None:
                    loop.tick()
            return 0
        except RuntimeError as e:
            print(f"tandem up: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            started = [p for p in scaled.processes() if p not in {c.proc for c in children}] if scaled else []
            _stop(children + [_Child("planner's worker", p) for p in started], settings.grace_s)
