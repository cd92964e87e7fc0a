"""`tandem up --ray ADDRESS`: the router, the pools and the KV stores (--kv-store N) as Ray actors on
an existing Ray cluster, this process their driver (and their owner: they end with it). etcd is
`--etcd`, or one this process starts on its node's address. Ctrl-C / SIGTERM drains the router,
then the workers, then the KV stores (the workers use them until they leave), then ends.

Output: the lines of the local launcher (cluster/launcher.py), each worker, kvstore and router
line with `node=<Ray node id> actor=<actor name>` added, and again for every new incarnation (an
actor Ray restarted, or a replacement) after READY. Actors are named in the Ray namespace
`tandem-<cluster>` (`ray list actors`): `kvstore-0`, `router-1`, `prefill-2`, `decode-3`, ...
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from cluster.launcher import await_workers, etcd_endpoint
from cluster.planner.loop import PlannerLoop, observation_source
from cluster.planner.settings import PlannerSettings
from cluster.ray_backend.actor import Component, ServerActor, ServerSettings
from cluster.ray_backend.fleet import ActorFleet, Member
from cluster.ray_backend.placement import Placement, plan_placement
from cluster.up_events import Announcer, ClusterReady, EtcdUp, KVStoreUp, PlannerUp, RouterUp, WorkerUp
from cluster.up_settings import UpSettings
from common.settings import env_name, environment

log = logging.getLogger(__name__)

FORWARDED_PREFIXES = ("UCX_", "NIXL_", "NCCL_", "TANDEM_")  # the driver's settings of these reach every actor


def namespace(cluster: str) -> str:
    return f"tandem-{cluster}"


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables the actors get from the driver: transport tuning and Tandem's own, secrets left out
    (they travel inside the settings)."""
    secret = {env_name(f.name) for f in fields(UpSettings) if f.metadata.get("secret")}
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) and k not in secret}


def member_event(member: Member) -> RouterUp | WorkerUp | KVStoreUp:
    """What `tandem up` reports of a serving actor."""
    info = member.info
    assert info is not None
    if info.component == "router":
        return RouterUp.from_ready(list(info.fields), info.pid, info.node_id, member.name)
    if info.component == "kvstore":
        return KVStoreUp.from_ready(list(info.fields), info.pid, info.node_id, member.name)
    return WorkerUp.from_ready(list(info.fields), info.component, info.pid, info.node_id, member.name)


class ActorFactory:
    """Creates the named ServerActors of one cluster: settings, placement and restart policy."""

    def __init__(self, settings: UpSettings, etcd: str, placement: Placement) -> None:
        import ray

        self.settings, self.etcd, self.placement = settings, etcd, placement
        self.env = forwarded_env(environment())
        self.remote_class = ray.remote(ServerActor)

    def server_settings(self, component: Component) -> ServerSettings:
        if component == "router":
            return self.settings.router_settings(self.etcd)
        if component == "kvstore":
            return self.settings.kv_store_settings(self.etcd)
        return self.settings.worker_settings(component, self.etcd)

    def __call__(self, component: Component, name: str) -> Any:
        s = self.settings
        restarts = -1 if s.ray_max_restarts is None else s.ray_max_restarts
        return self.remote_class.options(  # type: ignore[attr-defined]
            name=name, namespace=namespace(s.cluster), max_restarts=restarts, max_concurrency=4,
            **self.placement.for_component(component).options(),
        ).remote(component, self.server_settings(component), self.env, s.start_timeout_s)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raises RuntimeError unless a host:port address accepts connections (ray.init would retry for
    minutes); "auto" and ray:// addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()  # [v6]:port too
    except OSError as e:
        raise RuntimeError(f"no Ray cluster at {address} ({e}): start one with `ray start --head`") from None


def up_on_ray(settings: UpSettings, planner: PlannerSettings | None = None) -> int:
    import ray

    try:
        check_reachable(settings.ray)
    except RuntimeError as e:
        print(f"tandem up: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        ray.init(address=settings.ray, namespace=namespace(settings.cluster), log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        print(f"tandem up: could not connect to the Ray cluster at {settings.ray!r}: {e}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        host = ray.util.get_node_ip_address()
        counts: dict[Component, int] = {"kvstore": settings.kv_store, "router": 1, "prefill": settings.prefill,
                                        "decode": settings.decode, "both": settings.both}
        placement = plan_placement(settings.ray_placement, ray.cluster_resources(),
                                   [c for c, n in counts.items() if n or (planner and c != "both")],
                                   settings.ray_worker_cpus, ray.get_runtime_context().get_node_id(),
                                   {role: settings.degree(role) for role in ("prefill", "decode", "both")})
        log.info("Ray placement: %s", placement.mode)
        announce = Announcer(settings.output_format)
        with etcd_endpoint(settings.etcd, host) as etcd:
            announce(EtcdUp(etcd))
            fleet = ActorFleet(ActorFactory(settings, etcd, placement), lambda m: announce(member_event(m)),
                               settings.grace_s + 5.0)
            try:
                fleet.start(counts)
                _serve(settings, planner, fleet, host, stop, announce)
            finally:
                fleet.stop(first=("router",), last=("kvstore",))  # while etcd runs: drains revoke their records
        return 0
    except (RuntimeError, ValueError) as e:
        print(f"tandem up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        ray.shutdown()


def _serve(settings: UpSettings, planner: PlannerSettings | None, fleet: ActorFleet, host: str,
           stop: threading.Event, announce: Announcer) -> None:
    """Once every actor serves and the router sees every worker: READY, then supervise until `stop`."""
    fleet.wait_ready(settings.start_timeout_s, stop)
    router = fleet.serving("router")[0].info
    assert router is not None
    http_url = router.fields[2]
    await_workers(http_url, settings.prefill + settings.decode + settings.both, settings.start_timeout_s,
                  settings.https_context(), stop)
    loop = None
    if planner is not None:
        loop = PlannerLoop(planner, observation_source(planner, f"{http_url}/metrics", settings.https_context()),
                           fleet)
        announce(PlannerUp(loop.metrics.serve(planner.planner_metrics_port, host)))
    announce(ClusterReady())
    print(f"OpenAI API: {http_url}/v1 (actors in Ray namespace {namespace(settings.cluster)}); Ctrl-C stops the "
          "cluster", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        fleet.supervise()
        if loop is not None:
            loop.tick()
