"""`python -m decode_worker --etcd HOST:PORT [...]`: one decode (or aggregated) worker process.
Every flag can also be set through the environment as TANDEM_<FLAG> (e.g. TANDEM_ETCD)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import fields

from decode_worker.server import WorkerSettings, serve


def parse_settings(argv: list[str] | None = None) -> WorkerSettings:
    parser = argparse.ArgumentParser(prog="python -m decode_worker", description=__doc__)
    defaults = WorkerSettings(etcd="")
    for f in fields(WorkerSettings):
        env = os.environ.get(f"TANDEM_{f.name.upper()}")
        default = getattr(defaults, f.name)
        kind = float if isinstance(default, float) else int if isinstance(default, int) else str
        if f.name == "num_kv_blocks":
            kind = int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=env if env is not None else default,
                            required=f.name == "etcd" and env is None, help=f"(env TANDEM_{f.name.upper()})")
    args = parser.parse_args(argv)
    return WorkerSettings(**{f.name: getattr(args, f.name) for f in fields(WorkerSettings)})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(parse_settings()))


if __name__ == "__main__":
    main()
