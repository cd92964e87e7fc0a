"""The pools of `tandem up` as local worker processes: growing starts workers, shrinking sends the
newest workers SIGTERM, which drains them (worker_runtime/server.py: health NOT_SERVING, etcd
record revoked, in-flight requests finish within --grace-s), so no request fails because of it.

Call `scale` from the thread that will outlive the workers (the launcher's main thread): a
worker is killed by the kernel when the thread that spawned it exits (common.processes)."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from collections.abc import Callable

from cluster.planner.settings import POOLS, Pool

log = logging.getLogger(__name__)

StartWorker = Callable[[Pool], subprocess.Popen]  # a worker process of the pool's role, stdout piped as text
OnReady = Callable[[Pool, subprocess.Popen, list[str]], None]  # its READY line's fields: id, address, metrics port


class LocalProcessActuator:
    """Invariant: `_serving[pool]` holds the pool's processes that were not told to stop, oldest
    first; `_draining` those told to stop that may still run."""

    def __init__(self, start_worker: StartWorker, on_ready: OnReady | None = None) -> None:
        self._start_worker, self._on_ready = start_worker, on_ready
        self._serving: dict[Pool, list[subprocess.Popen]] = {pool: [] for pool in POOLS}
        self._draining: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def adopt(self, pool: Pool, proc: subprocess.Popen) -> None:
        """A worker started (and announced) by the launcher."""
        with self._lock:
            self._serving[pool].append(proc)

    def current_replicas(self, pool: Pool) -> int:
        with self._lock:
            self._reap()
            return len(self._serving[pool])

    def scale(self, pool: Pool, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        with self._lock:
            self._reap()
            serving = self._serving[pool]
            while len(serving) < replicas:
                proc = self._start_worker(pool)
                serving.append(proc)
                threading.Thread(target=self._await_ready, args=(pool, proc), daemon=True,
                                 name=f"ready-{pool}-{proc.pid}").start()
                log.info("started a %s worker (pid %d)", pool, proc.pid)
            while len(serving) > replicas:
                proc = serving.pop()  # the newest: the launcher's own workers stay longest
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    self._draining.append(proc)
                    log.info("draining a %s worker (pid %d)", pool, proc.pid)

    def processes(self) -> list[subprocess.Popen]:
        """Every process this actuator started or adopted that may still run (for the launcher's stop)."""
        with self._lock:
            self._reap()
            return [p for pool in POOLS for p in self._serving[pool]] + list(self._draining)

    def _reap(self) -> None:
        """Forget the processes that exited (a drained worker, or one that died)."""
        for pool in POOLS:
            for proc in [p for p in self._serving[pool] if p.poll() is not None]:
                log.warning("a %s worker (pid %d) exited with %s", pool, proc.pid, proc.returncode)
                self._serving[pool].remove(proc)
        self._draining = [p for p in self._draining if p.poll() is None]

    def _await_ready(self, pool: Pool, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY ") and self._on_ready is not None:
                self._on_ready(pool, proc, line.split()[1:])
