"""Prometheus metrics of the planner, in a registry of its own (it may share a process, e.g. the
`tandem up` launcher or a test, with other metrics). The names are the ones
deploy/prometheus/rules/tandem-alerts.rules.yml expects."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from cluster.planner.policy import Decision
from cluster.planner.settings import POOLS, PlannerSettings


class PlannerMetrics:
    def __init__(self, settings: PlannerSettings) -> None:
        self.registry = CollectorRegistry()
        self.desired = Gauge("tandem_planner_desired_replicas", "Workers the planner wants in the pool",
                             ["pool"], registry=self.registry)
        self.current = Gauge("tandem_planner_current_replicas", "Workers the pool has, as its scaler reports",
                             ["pool"], registry=self.registry)
        self.min = Gauge("tandem_planner_min_replicas", "The pool's lower bound", ["pool"], registry=self.registry)
        self.max = Gauge("tandem_planner_max_replicas", "The pool's upper bound", ["pool"], registry=self.registry)
        self.decisions = Counter("tandem_planner_decisions", "Planner decisions, by pool, action (scale_up, "
                                 "scale_down, hold) and reason", ["pool", "action", "reason"],
                                 registry=self.registry)
        for pool in POOLS:
            bounds = settings.bounds(pool)
            self.min.labels(pool).set(bounds.min)
            self.max.labels(pool).set(bounds.max)

    def record(self, decision: Decision) -> None:
        self.current.labels(decision.pool).set(decision.current)
        self.desired.labels(decision.pool).set(decision.desired)
        self.decisions.labels(decision.pool, decision.action, decision.reason).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics (background thread); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
