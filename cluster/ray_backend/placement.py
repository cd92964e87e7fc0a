"""Where Ray places each actor of a Tandem cluster, and what it reserves there.

  resources  prefill workers need the custom resource {"prefill": 1}, decode and aggregated
             workers {"decode": 1}: start the nodes of each pool with `ray start --resources`;
             in a cluster with GPUs each worker also takes one GPU
  gpus       every worker needs one GPU (Ray sets CUDA_VISIBLE_DEVICES for it)
  any        workers go wherever their CPUs fit
  auto       resources when the cluster defines every one needed, else gpus when it has GPUs,
             else any

The router goes to a node with the custom resource "router" when one exists, else (preferably)
the driver's node, so `tandem up --ray`'s ports are where it was started. A KV store goes to a node
with the custom resource "kvstore" when one exists, else anywhere; it needs no GPU. Neither reserves
CPU, and neither resource is required by any mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.ray_backend.actor import Component
from cluster.up_settings import PlacementMode

POOL_RESOURCE: Mapping[Component, str] = {"prefill": "prefill", "decode": "decode", "both": "decode",
                                          "router": "router", "kvstore": "kvstore"}
SERVICES: tuple[Component, ...] = ("router", "kvstore")  # placed by their resource only where the cluster has it


@dataclass(frozen=True)
class ActorPlacement:
    """Ray actor options of one component."""
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    near_node: str | None = None  # soft node affinity (Ray node id)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                "resources": dict(self.resources)}
        if self.near_node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.near_node, soft=True)
        return opts


@dataclass(frozen=True)
class Placement:
    mode: Literal["resources", "gpus", "any"]  # what "auto" resolved to
    worker_cpus: float
    worker_gpus: float  # 1 or 0: a worker's rank uses one device
    router: ActorPlacement
    kv_store: ActorPlacement
    # a pool's tensor-parallel degree (absent: 1): its worker actor runs that many ranks, each with worker_cpus
    # and a device (Ray gives the actor that many in CUDA_VISIBLE_DEVICES; engine.parallel hands one to each rank)
    degrees: Mapping[str, int] = field(default_factory=dict)

    def for_component(self, component: Component) -> ActorPlacement:
        if component == "router":
            return self.router
        if component == "kvstore":
            return self.kv_store
        resources = {POOL_RESOURCE[component]: 1.0} if self.mode == "resources" else {}
        ranks = self.degrees.get(component, 1)
        return ActorPlacement(self.worker_cpus * ranks, self.worker_gpus * ranks, resources)


def plan_placement(mode: PlacementMode, cluster_resources: Mapping[str, float], roles: Iterable[Component],
                   worker_cpus: float, driver_node: str, degrees: Mapping[str, int] | None = None) -> Placement:
    """Raises ValueError when the Ray cluster lacks what `mode` needs (an actor would wait forever)."""
    needed = sorted({POOL_RESOURCE[r] for r in roles if r not in SERVICES})
    missing = [name for name in needed if cluster_resources.get(name, 0.0) < 1.0]
    has_gpus = cluster_resources.get("GPU", 0.0) >= 1.0
    if mode == "auto":
        resolved: Literal["resources", "gpus", "any"] = "resources" if not missing else "gpus" if has_gpus else "any"
    else:
        resolved = mode
    if resolved == "resources" and missing:
        raise ValueError(f"the Ray cluster has no {', '.join(repr(m) for m in missing)} resource: start the nodes "
                         "of each pool with e.g. `ray start --resources '{\"decode\": 1}'`, or --ray-placement any")
    if resolved == "gpus" and not has_gpus:
        raise ValueError("--ray-placement gpus: the Ray cluster has no GPU")
    if cluster_resources.get("router", 0.0) >= 1.0:
        router = ActorPlacement(resources={"router": 1.0})
    else:
        router = ActorPlacement(near_node=driver_node)
    kv_store = ActorPlacement(resources={"kvstore": 1.0} if cluster_resources.get("kvstore", 0.0) >= 1.0 else {})
    return Placement(resolved, worker_cpus, 1.0 if resolved != "any" and has_gpus else 0.0, router, kv_store,
                     dict(degrees or {}))
