"""How one pool's latency responds to its load, from the capacity profile: the load one worker
carries at the latency target, and the factor by which the latency changes when each worker's
load moves (the projection the policy makes before removing a worker). Without a profile the
latency is assumed to grow in proportion to the load per worker (pessimistic for decode)."""

from __future__ import annotations

import math

from cluster.planner.capacity import CapacityProfile
from cluster.planner.settings import Pool


class PoolModel:
    def __init__(self, pool: Pool, profile: CapacityProfile | None, target_s: float, quantile: float) -> None:
        self.pool, self.quantile = pool, quantile
        self.profile = profile
        self.capacity: float | None = None  # load one worker carries at the target; None: unknown
        if profile is not None:
            self.capacity = (profile.prefill_tokens_per_s if pool == "prefill"
                             else profile.decode_streams_within(target_s, quantile))

    def workers_needed(self, load: float) -> float | None:
        """Workers' worth of load (fractional); None without a profile."""
        return None if not self.capacity else load / self.capacity

    def latency_factor(self, per_worker_from: float, per_worker_to: float) -> float:
        """latency(to) / latency(from) for one worker's load moving from → to (to >= from)."""
        if per_worker_to <= per_worker_from:
            return 1.0
        if self.pool == "decode" and self.profile is not None and self.profile.decode:
            before = self.profile.decode_itl_s(per_worker_from, self.quantile)
            after = self.profile.decode_itl_s(per_worker_to, self.quantile)
            assert before is not None and after is not None  # the profile has decode points
            return after / before
        if self.pool == "prefill" and self.capacity:
            # a queue: time in system ~ 1 / (1 - utilization)
            busy_from, busy_to = per_worker_from / self.capacity, per_worker_to / self.capacity
            return math.inf if busy_to >= 1 else (1 - min(busy_from, 0.99)) / (1 - busy_to)
        return math.inf if per_worker_from <= 0 else per_worker_to / per_worker_from
