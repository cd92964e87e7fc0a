"""What the planner scales through: one interface, one implementation per platform.

  LocalProcessActuator  (cluster.planner.local_actuator) worker processes of `tandem up`
  ActorFleet            (cluster.ray_backend.fleet) worker actors of `tandem up --ray`
  KubernetesActuator    (here) the scale subresource of each pool's Deployment
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cluster.planner.settings import POOLS, PlannerServiceSettings, Pool

log = logging.getLogger(__name__)

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
FIELD_MANAGER = "tandem-planner"


class Actuator(Protocol):
    def current_replicas(self, pool: Pool) -> int:
        """Workers the pool has now, counting those starting and not those draining."""
        ...

    def scale(self, pool: Pool, replicas: int) -> None:
        """Set the pool's size. Shrinking drains the workers it removes (SIGTERM: they stop taking
        work, finish what they have, leave etcd), so no request fails because of it. Raises on failure."""
        ...


class KubernetesActuator:
    """The pools are Deployments; their sizes are read and set through the scale subresource
    (GET / PATCH .../deployments/NAME/scale: the verbs deploy/k8s/base/planner-rbac.yaml grants).
    `current_replicas` is the Deployment's spec.replicas: what was asked for, pods pending or not
    (the planner must not ask again for pods it has asked for)."""

    def __init__(self, api: Any, namespace: str, deployments: Mapping[Pool, str], timeout_s: float = 10.0) -> None:
        self.api, self.namespace, self.timeout_s = api, namespace, timeout_s  # api: kubernetes.client.AppsV1Api
        self.deployments = dict(deployments)

    def current_replicas(self, pool: Pool) -> int:
        scale = self.api.read_namespaced_deployment_scale(self.deployments[pool], self.namespace,
                                                          _request_timeout=self.timeout_s)
        return int(scale.spec.replicas or 0)

    def scale(self, pool: Pool, replicas: int) -> None:
        # a JSON merge patch of spec.replicas alone: it cannot clobber anything else of the object
        self.api.patch_namespaced_deployment_scale(
            self.deployments[pool], self.namespace, {"spec": {"replicas": replicas}}, field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json", _request_timeout=self.timeout_s)

    @classmethod
    def from_settings(cls, settings: PlannerServiceSettings) -> KubernetesActuator:
        from kubernetes import client, config  # type: ignore[import-untyped]

        if settings.kube_api_server:
            configuration = client.Configuration(host=settings.kube_api_server)
        else:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
        namespace = settings.kube_namespace or (_SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
                                                if _SERVICE_ACCOUNT_NAMESPACE.exists() else "default")
        deployments: dict[Pool, str] = {"prefill": settings.prefill_deployment, "decode": settings.decode_deployment}
        assert set(deployments) == set(POOLS)
        return cls(client.AppsV1Api(client.ApiClient(configuration)), namespace, deployments)
