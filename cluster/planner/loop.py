"""The planner's cycle: observe, decide, log and count every decision, apply the scaling ones.
Synchronous: `tandem up` calls `tick()` from its main loop (the thread that owns the workers),
`tandem planner` runs `run()`."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable

from cluster.planner.actuator import Actuator
from cluster.planner.capacity import CapacityProfile
from cluster.planner.metrics import PlannerMetrics
from cluster.planner.observation import Observation, ObservationSource
from cluster.planner.policy import Decision, Policy
from cluster.planner.settings import POOLS, PlannerSettings
from cluster.planner.sources import PrometheusSource, RouterScrapeSource

log = logging.getLogger("cluster.planner")


def observation_source(settings: PlannerSettings, router_metrics_url: str,
                       context: ssl.SSLContext | None = None) -> ObservationSource:
    """Prometheus when its URL is set, else the router's /metrics."""
    if settings.prometheus_url:
        return PrometheusSource(settings.prometheus_url, settings.latency_quantile, settings.planner_window_s,
                                settings.prometheus_selector)
    return RouterScrapeSource(router_metrics_url, settings.latency_quantile, settings.planner_window_s, context)


class PlannerLoop:
    def __init__(self, settings: PlannerSettings, source: ObservationSource, actuator: Actuator,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.source, self.actuator, self.clock = settings, source, actuator, clock
        profile = CapacityProfile.load(settings.capacity_profile) if settings.capacity_profile else None
        self.policy = Policy(settings, profile)
        self.metrics = PlannerMetrics(settings)
        self._next_at = clock()
        self._last_reason: dict[str, str] = {}
        for pool in POOLS:
            model = self.policy.models[pool]
            log.info("planner: %s pool target q%g %.4fs, capacity per worker %s, bounds %s", pool,
                     settings.latency_quantile, settings.target_s(pool),
                     "unknown (not profiled)" if model.capacity is None else f"{model.capacity:.2f}",
                     settings.bounds(pool))

    def tick(self) -> list[Decision] | None:
        """`step()` if an interval has passed since the last one. Never raises: a planner failing
        (its scaler unreachable, say) must not take down what it scales."""
        now = self.clock()
        if now < self._next_at:
            return None
        self._next_at = now + self.settings.planner_interval_s
        try:
            return self.step()
        except Exception:
            log.exception("planner: step failed")
            return None

    def step(self) -> list[Decision]:
        observation = self._observe()
        current = {pool: self.actuator.current_replicas(pool) for pool in POOLS}
        decisions = self.policy.decide(self.clock(), observation, current)
        for d in decisions:
            self.metrics.record(d)
            self._log(d)
        # shrinking first: a move between pools asks the scaler to drain the giver's workers before it asks
        # for the receiver's (the drain itself may outlast the request: a new worker may start beside a
        # draining one), and a move whose shrinking failed grows nothing, not even growth the budget allowed
        shrink_failed = False
        for d in sorted((d for d in decisions if d.action != "hold"), key=lambda d: d.action != "scale_down"):
            if d.reason == "rebalance" and d.action == "scale_up" and shrink_failed:
                log.warning("planner: not growing %s: the pool that was to give its workers did not shrink", d.pool)
                continue
            try:
                self.actuator.scale(d.pool, d.desired)
            except Exception:  # the next interval tries again (after the cooldown)
                shrink_failed = shrink_failed or d.action == "scale_down"
                log.exception("planner: scaling %s to %d failed", d.pool, d.desired)
        return decisions

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.tick()
            stop.wait(max(self._next_at - self.clock(), 0.0))

    def _observe(self) -> Observation | None:
        try:
            return self.source.observe()
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("planner: no observation (%s)", e)
            return None

    def _log(self, d: Decision) -> None:
        """Scaling decisions at INFO; holds at INFO when their reason changes, else DEBUG (one line each)."""
        changed = self._last_reason.get(d.pool) != d.reason
        self._last_reason[d.pool] = d.reason
        log.log(logging.INFO if d.action != "hold" or changed else logging.DEBUG, "planner: %s", d.line())
