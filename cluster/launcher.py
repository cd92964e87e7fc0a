"""`tandem up`: a whole local cluster as separate OS processes — etcd (unless one is given), the
workers, the router — until Ctrl-C / SIGTERM, which stops them all (router first, so no request
is sent to a worker that is already gone).

Output, one line each (scripts and tests parse them):
  etcd <host:port>
  worker <id> <role> <grpc address> pid=<pid> metrics=<port>
  router grpc=<host:port> http=<url> pid=<pid>      (url: https://... with TLS)
  planner metrics=<port>                             (with --planner true)
  READY
  worker <id> <role> <grpc address> pid=<pid> metrics=<port>   (later: one the planner started)

With --planner true the SLO planner (cluster/planner) sizes the prefill and decode pools: it starts
workers, and stops them with SIGTERM, which drains them. With --ray the same cluster runs as Ray
actors instead (cluster/ray_backend/launcher.py).

Every child gets the security settings (cluster.security_settings): file paths as flags, secrets
(etcd password, API keys) as TANDEM_* variables, never in argv.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from cluster.api_keys import ApiKeys
from cluster.flags import described, settings_from_argv
from cluster.local_etcd import running_etcd
from cluster.planner.local_actuator import LocalProcessActuator
from cluster.planner.loop import PlannerLoop, observation_source
from cluster.planner.settings import PlannerSettings, Pool
from cluster.processes import spawn
from cluster.ray_backend.placement import PLACEMENT_MODES, PlacementMode
from cluster.router_settings import RouterSettings
from cluster.routing import PolicyName
from cluster.security_settings import SecuritySettings
from cluster.tls import client_ssl_context
from cluster.worker_settings import WorkerSettings
from engine.engine_config import ComputeDtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpSettings(SecuritySettings):
    prefill: int = field(default=1, metadata=described("prefill workers"))
    decode: int = field(default=1, metadata=described("decode workers"))
    both: int = field(default=0, metadata=described("aggregated workers (prefill and decode in one)"))
    etcd: str = field(default="", metadata=described("existing etcd host:port; empty: start a local one"))
    cluster: str = field(default="default", metadata=described("cluster name"))
    model: str | None = field(default=None, metadata=described("HF folder or .gguf; default SmolLM2-135M-Instruct"))
    dtype: ComputeDtype = field(default="auto", metadata=described("compute dtype of the workers"))
    num_kv_blocks: int | None = field(default=None, metadata=described("KV blocks per worker"))
    max_num_seqs: int = field(default=64, metadata=described("most sequences in one worker's batch"))
    min_remote_prefill_tokens: int = field(default=32, metadata=described("shorter prompts prefill on decode"))
    num_threads: int | None = field(default=None, metadata=described("torch threads per worker on CPU"))
    prefill_timeout_s: float = field(default=30.0, metadata=described("deadline of one remote prefill"))
    max_queued_requests: int = field(default=256, metadata=described("requests a worker queues beyond a full batch"))
    max_inflight: int = field(default=512, metadata=described("requests in flight at the router before 429"))
    kv_backends: str = field(default="", metadata=described("transfer backends, comma separated; empty: all"))
    policy: PolicyName = field(default="kv_aware", metadata=described("routing policy"))
    host: str = field(default="127.0.0.1", metadata=described("address every component binds"))
    http_port: int = field(default=8000, metadata=described("OpenAI-compatible HTTP port"))
    grpc_port: int = field(default=50051, metadata=described("tandem.v1.Inference gRPC port"))
    lease_ttl_s: int = field(default=3, metadata=described("etcd lease of each worker record"))
    grace_s: float = field(default=10.0, metadata=described("on stop: seconds in-flight requests get"))
    start_timeout_s: float = field(default=600.0, metadata=described("how long the processes get to start"))
    api_keys_file: str | None = field(default=None, metadata=described("the router's API key file (see router)"))
    api_keys: str = field(default="", repr=False, metadata=described(
        "the router's API keys, comma separated; handed on as a variable, not a flag", secret=True))
    planner: bool = field(default=False, metadata=described(
        "run the SLO planner: it scales the prefill and decode pools (its flags: --itl-target-s, ...)"))
    ray: str = field(default="", metadata=described(
        "a Ray cluster's address (host:port, or auto): the router and the pools run as Ray actors there "
        "(docs/deployment-ray.md); empty: local processes"))
    ray_placement: PlacementMode = field(default="auto", metadata=described(
        "with --ray: resources (custom resources prefill / decode / router), gpus (one per worker), any, "
        "or auto (resources if defined, else gpus if any, else any)"))
    ray_worker_cpus: float = field(default=1.0, metadata=described(
        "with --ray: CPUs each worker actor reserves (on CPU nodes also its torch threads)"))
    ray_max_restarts: int | None = field(default=None, metadata=described(
        "with --ray: restarts Ray gives an actor that died before replacing it; default unlimited"))

    def __post_init__(self) -> None:
        super().__post_init__()
        ApiKeys.load(self.api_keys_file, self.api_keys)
        etcd_access = self.etcd_access()
        if not self.etcd and (etcd_access.tls or etcd_access.user is not None):
            raise ValueError("etcd TLS and user options need --etcd: the local etcd is plaintext, without auth")
        if min(self.prefill, self.decode, self.both) < 0 or self.decode + self.both == 0:
            raise ValueError("need at least one decode or aggregated worker, and no negative counts")
        if self.planner and self.both:
            raise ValueError("the planner scales the prefill and decode pools: no aggregated workers with it")
        if self.ray_placement not in PLACEMENT_MODES:
            raise ValueError(f"ray_placement must be one of {PLACEMENT_MODES}, got {self.ray_placement!r}")
        if not self.ray_worker_cpus >= 0 or (self.ray_max_restarts is not None and self.ray_max_restarts < 0):
            raise ValueError("ray_worker_cpus and ray_max_restarts must be >= 0")

    def worker_args(self, role: str, etcd: str) -> list[str]:
        args = ["worker", "--role", role, "--etcd", etcd, "--cluster", self.cluster, "--dtype", self.dtype,
                "--host", self.host, "--max-num-seqs", str(self.max_num_seqs), "--lease-ttl-s", str(self.lease_ttl_s),
                "--min-remote-prefill-tokens", str(self.min_remote_prefill_tokens), "--grace-s", str(self.grace_s),
                "--prefill-timeout-s", str(self.prefill_timeout_s),
                "--max-queued-requests", str(self.max_queued_requests)]
        for flag, value in (("--model", self.model), ("--num-kv-blocks", self.num_kv_blocks),
                            ("--num-threads", self.num_threads),
                            ("--kv-backends", self.kv_backends or None)):
            if value is not None:
                args += [flag, str(value)]
        return args + self.security_args()

    def router_args(self, etcd: str) -> list[str]:
        args = ["router", "--etcd", etcd, "--cluster", self.cluster, "--host", self.host, "--policy", self.policy,
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--grace-s", str(self.grace_s),
                "--max-inflight", str(self.max_inflight)]
        args += ["--model", self.model] if self.model else []
        args += ["--api-keys-file", self.api_keys_file] if self.api_keys_file else []
        return args + self.security_args()

    def worker_settings(self, role: str, etcd: str) -> WorkerSettings:
        """What `tandem worker` with worker_args and security_env would run (for in-process workers)."""
        return settings_from_argv(WorkerSettings, self.worker_args(role, etcd)[1:], etcd_password=self.etcd_password)

    def router_settings(self, etcd: str) -> RouterSettings:
        return settings_from_argv(RouterSettings, self.router_args(etcd)[1:], etcd_password=self.etcd_password,
                                  api_keys=self.api_keys)

    def router_env(self) -> dict[str, str]:
        """Secrets for the router, as variables: argv is world-readable."""
        return {**self.security_env(), **({"TANDEM_API_KEYS": self.api_keys} if self.api_keys else {})}

    def https_context(self) -> ssl.SSLContext | None:
        files = self.tls_files()
        return None if files is None else client_ssl_context(files)


def _print_line(head: str, extra: dict[str, str]) -> None:
    print(" ".join([head, *(f"{k}={v}" for k, v in extra.items())]), flush=True)


def print_worker_line(ready: list[str], role: str, pid: int, **extra: str) -> None:
    """The worker's output line, from its READY fields (id, address, metrics port)."""
    worker_id, address, metrics = ready
    _print_line(f"worker {worker_id} {role} {address} pid={pid} metrics={metrics}", extra)


def print_router_line(ready: list[str], pid: int, **extra: str) -> None:
    """The router's output line, from its READY fields ("router", gRPC address, HTTP URL)."""
    _, grpc_address, http_url = ready
    _print_line(f"router grpc={grpc_address} http={http_url} pid={pid}", extra)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    ready: list[str] = field(default_factory=list)


def _start(name: str, args: list[str], env: dict[str, str]) -> _Child:
    # its own process group: a terminal's Ctrl-C reaches only the launcher, which stops the children in order
    proc = spawn([sys.executable, "-m", "cluster.cli", *args], stdout=subprocess.PIPE, text=True, process_group=0,
                 env={**os.environ, **env})
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
                   roles: list[str], http_url: str) -> tuple[PlannerLoop, LocalProcessActuator]:
    """The planner over this launcher's workers; it prints a worker line for each worker it starts."""
    def start(pool: Pool) -> subprocess.Popen:
        return _start(f"{pool} worker", settings.worker_args(pool, etcd), settings.security_env()).proc

    def announce(pool: Pool, proc: subprocess.Popen, ready: list[str]) -> None:
        print_worker_line(ready, pool, proc.pid)
    actuator = LocalProcessActuator(start, announce)
    for child, role in zip(workers, roles, strict=True):
        actuator.adopt("prefill" if role == "prefill" else "decode", child.proc)
    loop = PlannerLoop(planner, observation_source(planner, f"{http_url}/metrics", settings.https_context()),
                       actuator)
    print(f"planner metrics={loop.metrics.serve(planner.planner_metrics_port, settings.host)}", flush=True)
    return loop, actuator


def up(settings: UpSettings, planner: PlannerSettings | None = None) -> int:
    """`planner`: run the SLO planner over the prefill and decode pools (settings.planner)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with etcd_endpoint(settings.etcd) as etcd:
        print(f"etcd {etcd}", flush=True)
        roles = ["prefill"] * settings.prefill + ["decode"] * settings.decode + ["both"] * settings.both
        workers = [_start(f"{role} worker {i}", settings.worker_args(role, etcd), settings.security_env())
                   for i, role in enumerate(roles)]
        router = _start("router", settings.router_args(etcd), settings.router_env())
        children = [router, *workers]
        scaled: LocalProcessActuator | None = None
        try:
            _await_ready([*workers, router], settings.start_timeout_s)
            for child, role in zip(workers, roles, strict=True):
                print_worker_line(child.ready, role, child.proc.pid)
            print_router_line(router.ready, router.proc.pid)
            http_url = router.ready[2]
            await_workers(http_url, len(workers), settings.start_timeout_s, settings.https_context())
            loop, scaled = (None, None) if planner is None else _local_planner(settings, planner, etcd, workers,
                                                                                roles, http_url)
            print("READY", flush=True)
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
