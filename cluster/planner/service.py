"""`tandem planner`: the planner as its own process (e.g. a Kubernetes pod running as the
tandem-planner service account), scaling the pools' Deployments until SIGTERM / Ctrl-C.

Output: `READY planner metrics=<port>` once its /metrics is served."""

from __future__ import annotations

import signal
import threading

from cluster.planner.actuator import KubernetesActuator
from cluster.planner.loop import PlannerLoop, observation_source
from cluster.planner.settings import PlannerServiceSettings


def serve(settings: PlannerServiceSettings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    loop = PlannerLoop(settings, observation_source(settings, settings.router_metrics_url),
                       KubernetesActuator.from_settings(settings))
    port = loop.metrics.serve(settings.planner_metrics_port, settings.planner_metrics_host)
    print(f"READY planner metrics={port}", flush=True)
    loop.run(stop)
    return 0
