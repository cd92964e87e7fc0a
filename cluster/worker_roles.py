"""`tandem worker --role R`: the server of role R (prefill_worker, or decode_worker for decode and
both), for the CLI and the Ray actors."""

from __future__ import annotations

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
    await serve(settings, role_builder(settings.role), lifecycle)
