"""`tandem` — run a Tandem cluster or one of its parts.

  tandem up      etcd (unless --etcd), workers and the router on this machine
  tandem worker  one worker (role prefill, decode or both) against an existing etcd
  tandem router  the router (gRPC tandem.v1.Inference + OpenAI HTTP) against an existing etcd

Every flag can also be set by an environment variable TANDEM_<FLAG> (e.g. TANDEM_ETCD).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from cluster.flags import add_settings_flags, settings_from_args
from cluster.launcher import UpSettings, up
from cluster.router_settings import RouterSettings
from cluster.worker_settings import WorkerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, text in (("up", UpSettings, "a local cluster"), ("worker", WorkerSettings, "one worker"),
                            ("router", RouterSettings, "the router")):
        add_settings_flags(sub.add_parser(name, help=text, description=f"tandem {name}: {text}. Every flag "
                                          "can also be set as TANDEM_<FLAG>."), cls)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv if argv is None else argv + sys.argv[1:])
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # NIXL/UCX: stay on loopback unless told otherwise
    if args.command == "up":
        sys.exit(up(settings_from_args(UpSettings, args)))
    if args.command == "worker":
        from cluster.worker_server import serve as serve_worker  # imports torch: not needed by `up`
        asyncio.run(serve_worker(settings_from_args(WorkerSettings, args)))
    else:
        from cluster.router_server import serve as serve_router
        asyncio.run(serve_router(settings_from_args(RouterSettings, args)))


if __name__ == "__main__":
    main()
