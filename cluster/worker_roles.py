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
    loop, which must stay free for the etcd calls of those starting before it."""
    build = role_builder(settings.role)
    if settings.replicas == 1:
        await serve(settings, build, lifecycle)
        return
    lifecycle = lifecycle or Lifecycle()
    prefix = settings.worker_id or f"{settings.role}-sim-{settings.host}-{os.getpid()}"
    running: list[asyncio.Task[None]] = []
    for i in range(settings.replicas):
        ready = asyncio.Event()

        def announce(fields: list[str], ready: asyncio.Event = ready) -> None:
            lifecycle.announce(fields)
            ready.set()

        replica = Lifecycle(announce=announce, stop=lifecycle.stop, signals=lifecycle.signals and i == 0)
        running.append(asyncio.create_task(serve(replace(settings, worker_id=f"{prefix}-{i}", replicas=1), build,
                                                 replica)))
        done, _ = await asyncio.wait({running[-1], asyncio.create_task(ready.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if running[-1] in done or lifecycle.stop.is_set():  # it failed (raise its error), or a stop came first
            break
    await asyncio.gather(*running)
