"""`tandem` — run a Tandem cluster or one of its parts.

  tandem up      etcd (unless --etcd), workers and the router on this machine (--ray: as Ray actors)
  tandem worker  one worker (role prefill, decode or both) against an existing etcd
  tandem router  the router (gRPC tandem.v1.Inference + OpenAI HTTP) against an existing etcd
  tandem kvstore a cluster KV store (KV blocks any worker reads instead of recomputing) against an existing etcd
  tandem profile measure a cluster's (or a worker's) capacity: the planner's profile (JSON)
  tandem planner the SLO planner, scaling the pools' Kubernetes Deployments (`up --planner true`: local)

Every flag can also be set by an environment variable TANDEM_<FLAG> (e.g. TANDEM_ETCD).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace

from cluster.launcher import up
from cluster.planner.settings import PlannerServiceSettings, PlannerSettings, Pool, ProfileSettings
from cluster.router_settings import RouterSettings
from cluster.up_settings import UpSettings
from common.settings import add_settings_flags, apply_ucx_defaults, configure_logging, settings_from_args
from kv_store.settings import KVStoreSettings
from worker_runtime.settings import WorkerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, text in (("up", UpSettings, "a local cluster"), ("worker", WorkerSettings, "one worker"),
                            ("router", RouterSettings, "the router"),
                            ("kvstore", KVStoreSettings, "a cluster KV store"),
                            ("profile", ProfileSettings, "measure capacity for the planner"),
                            ("planner", PlannerServiceSettings, "the SLO planner (Kubernetes)")):
        command = sub.add_parser(name, help=text, description=f"tandem {name}: {text}. Every flag "
                                 "can also be set as TANDEM_<FLAG>.")
        add_settings_flags(command, cls)
        if name == "up":  # the planner's flags, used with --planner true
            add_settings_flags(command, PlannerSettings)
    return parser


def planner_for(settings: UpSettings, args: argparse.Namespace) -> PlannerSettings | None:
    """`tandem up`'s planner (with --planner), counting a worker as its pool's tensor-parallel degree of devices."""
    if not settings.planner:
        return None
    given = settings_from_args(PlannerSettings, args)
    degrees: dict[Pool, int] = {"prefill": settings.degree("prefill"), "decode": settings.degree("decode")}
    for pool, devices in degrees.items():
        if given.worker_devices(pool) not in (1, devices):  # (1: the flag's default, left alone)
            raise ValueError(f"tandem up counts a {pool} worker as its tensor-parallel degree of devices "
                             f"({devices}), not --{pool}-worker-devices {given.worker_devices(pool)}")
    return replace(given, prefill_worker_devices=degrees["prefill"], decode_worker_devices=degrees["decode"])


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv if argv is None else argv + sys.argv[1:])
    configure_logging()
    if args.command == "up":
        settings = settings_from_args(UpSettings, args)
        planner = planner_for(settings, args)
        if settings.ray:  # the actors' nodes have their own network: UCX settings are the user's or the nodes'
            from cluster.ray_backend.launcher import up_on_ray

            sys.exit(up_on_ray(settings, planner))
        apply_ucx_defaults()  # NIXL/UCX: stay on loopback unless told otherwise
        sys.exit(up(settings, planner))
    apply_ucx_defaults()
    if args.command in ("profile", "planner"):
        from cluster.planner import profiler, service  # grpc clients, kubernetes: only these commands
        sys.exit(profiler.run(settings_from_args(ProfileSettings, args)) if args.command == "profile"
                 else service.serve(settings_from_args(PlannerServiceSettings, args)))
    if args.command == "kvstore":
        from kv_store.server import serve as serve_kv_store  # imports torch: not needed by `up`
        asyncio.run(serve_kv_store(settings_from_args(KVStoreSettings, args)))
    elif args.command == "worker":
        from cluster.worker_roles import serve_worker  # imports torch: not needed by `up`
        asyncio.run(serve_worker(settings_from_args(WorkerSettings, args)))
    else:
        from cluster.router_server import serve as serve_router
        asyncio.run(serve_router(settings_from_args(RouterSettings, args)))


if __name__ == "__main__":
    main()
