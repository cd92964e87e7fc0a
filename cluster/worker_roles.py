"""`tandem worker --role R`: the server of role R (prefill_worker, or decode_worker for decode and
both), for the CLI and the Ray actors; with --simulate --replicas N, N simulated workers in one process."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

from common.lifecycle import Lifecycle
from worker_runtime.server import RoleBuilder, serve
from worker_runtime.settings import WorkerSettings


def role_builder(role: str) -> RoleBuilder:
    if role == "prefill":
        from prefill_worker.server import build as build_prefill

        return build_prefill
    from decode_worker.server import build as build_decode

    return build_decode


async def serve_worker(settings: WorkerSettings, lifecycle: Lifecycle | None = None) -> None:
    """Until `lifecycle.stop` (default: SIGTERM / SIGINT); with replicas, every replica drains on it and
    each announces its own READY line. Replicas start one after another: building one blocks the event
    loop, which must stay free for the etcd calls of those starting before it. A replica that fails stops
    the others (each drains: its etcd record is revoked), then its error is raised."""
    build = role_builder(settings.role)
    if settings.replicas == 1:
        await serve(settings, build, lifecycle)
        return
    lifecycle = lifecycle or Lifecycle()
    prefix = settings.worker_id or f"{settings.role}-sim-{settings.host}-{os.getpid()}"
    running: list[asyncio.Task[None]] = []
    stopping = asyncio.create_task(lifecycle.stop.wait())
    try:
        for i in range(settings.replicas):
            ready = asyncio.Event()

            def announce(fields: list[str], ready: asyncio.Event = ready) -> None:
                lifecycle.announce(fields)
                ready.set()

            replica = Lifecycle(announce=announce, stop=lifecycle.stop, signals=lifecycle.signals and i == 0)
            running.append(asyncio.create_task(
                serve(replace(settings, worker_id=f"{prefix}-{i}", replicas=1), build, replica)))
            started = asyncio.create_task(ready.wait())
            await asyncio.wait({*running, started, stopping}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if stopping.done() or any(task.done() for task in running):
                break
        await asyncio.wait({*running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lifecycle.stop.set()  # a replica ended (failed) or a stop came: every replica drains
        results = await asyncio.gather(*running, return_exceptions=True)
        stopping.cancel()
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]
