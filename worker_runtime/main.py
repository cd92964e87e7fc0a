"""`python -m prefill_worker` / `python -m decode_worker`: one worker process from flags and
TANDEM_* variables (the same as `tandem worker --role ...`)."""

from __future__ import annotations

import argparse
import asyncio

from common.settings import add_settings_flags, apply_ucx_defaults, configure_logging, settings_from_args
from worker_runtime.server import RoleBuilder, serve
from worker_runtime.settings import WorkerSettings


def run_worker(prog: str, build: RoleBuilder, argv: list[str] | None = None, role: str | None = None) -> None:
    """Parse the worker's flags (`role` fixed when given) and serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_settings_flags(parser, WorkerSettings, skip=("role",) if role else ())
    args = parser.parse_args(argv)
    configure_logging()
    apply_ucx_defaults()  # NIXL/UCX: stay on loopback unless told otherwise
    overrides = {"role": role} if role else {}
    asyncio.run(serve(settings_from_args(WorkerSettings, args, **overrides), build))
