"""The body of every Tandem Ray actor: one server (a worker of some role, the router or a KV store)
running in the actor's own process, on a thread and event loop of its own, until told to drain.

Invariants:
- the constructor returns only once the server serves (its READY fields known); a first start
  that fails raises, so the driver reports the cause and Ray does not restart a broken setup;
- a server that ends without being asked to (a crash after it served), or a restarted
  incarnation that cannot start, exits the process: Ray restarts the actor (`max_restarts`);
- the server binds and advertises its Ray node's IP address, whatever `host` the driver had.

Imports nothing of Ray at module level: the Ray worker process has it; the driver decorates
`ServerActor` with `ray.remote` (cluster.ray_backend.launcher).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from cluster.router_settings import RouterSettings
from common.lifecycle import Lifecycle
from common.settings import configure_logging, update_environment
from kv_store.settings import KVStoreSettings
from worker_runtime.settings import WorkerSettings

log = logging.getLogger(__name__)

Component = Literal["prefill", "decode", "both", "router", "kvstore"]
ServerSettings = WorkerSettings | RouterSettings | KVStoreSettings


@dataclass(frozen=True)
class ServerInfo:
    """One incarnation of an actor's server: what the driver announces and routes by."""
    component: Component
    fields: tuple[str, ...]  # READY fields: worker or store id, address, metrics port / "router", gRPC, HTTP URL
    pid: int
    node_id: str


class _ServerThread:
    """`run(lifecycle)` on a thread with its own event loop."""

    def __init__(self, run: Callable[[Lifecycle], Awaitable[None]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._fields: list[str] | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._lifecycle = Lifecycle(announce=self._announce, stop=asyncio.Event(), signals=False)
        self._thread = threading.Thread(target=self._main, args=(run,), name="tandem-server", daemon=True)
        self._thread.start()

    def _announce(self, fields: list[str]) -> None:
        self._fields = fields
        self._ready.set()

    def _main(self, run: Callable[[Lifecycle], Awaitable[None]]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(run(self._lifecycle))
        except BaseException as e:  # reported by wait_ready, or below
            self._error = e
        finally:
            self._ready.set()
            if self._fields is not None and not self._stopping:
                log.error("the server ended without being asked to (%r): exiting, Ray restarts the actor",
                          self._error)
                logging.shutdown()
                os._exit(1)

    def wait_ready(self, timeout_s: float) -> list[str]:
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the server did not start within {timeout_s} s")
        if self._fields is None:
            error = self._error
            raise RuntimeError(f"the server failed to start: {type(error).__name__}: {error}") from error
        return self._fields

    def stop(self, timeout_s: float) -> bool:
        """Drain (as on SIGTERM); True once the server returned cleanly within `timeout_s`."""
        self._stopping = True
        self._loop.call_soon_threadsafe(self._lifecycle.stop.set)
        self._thread.join(timeout_s)
        return not self._thread.is_alive() and self._error is None


def _runner(component: Component, settings: ServerSettings) -> Callable[[Lifecycle], Awaitable[None]]:
    if component == "router":
        from cluster.router_server import serve as serve_router

        assert isinstance(settings, RouterSettings)
        return lambda lifecycle: serve_router(settings, lifecycle)
    if component == "kvstore":
        from kv_store.server import serve as serve_kv_store  # torch: only in store and worker actors

        assert isinstance(settings, KVStoreSettings)
        return lambda lifecycle: serve_kv_store(settings, lifecycle)
    from cluster.worker_roles import serve_worker  # torch: only in worker actors

    assert isinstance(settings, WorkerSettings) and settings.role == component
    return lambda lifecycle: serve_worker(settings, lifecycle)


class ServerActor:
    def __init__(self, component: Component, settings: ServerSettings, env: Mapping[str, str],
                 start_timeout_s: float) -> None:
        import ray

        update_environment(dict(env))  # before NIXL/UCX or torch read theirs
        configure_logging()
        context = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        self._server = _ServerThread(_runner(component, replace(settings, host=node_ip)))
        try:
            fields = self._server.wait_ready(start_timeout_s)
        except Exception:
            if context.was_current_actor_reconstructed:
                log.exception("a restarted %s could not start: exiting, Ray tries again", component)
                logging.shutdown()
                os._exit(1)
            raise
        self._info = ServerInfo(component, tuple(fields), os.getpid(), context.get_node_id())

    def info(self) -> ServerInfo:
        return self._info

    def drain(self, timeout_s: float) -> bool:
        """Stop taking work, finish what is in flight (the worker's --grace-s), leave etcd; True once
        done within `timeout_s`. The driver kills the actor after it."""
        return self._server.stop(timeout_s)
