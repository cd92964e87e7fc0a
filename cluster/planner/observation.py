"""What the planner sees of the cluster over one window: the one data currency between the
observation sources (cluster.planner.sources) and the policy (cluster.planner.policy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cluster.planner.settings import Pool


@dataclass(frozen=True)
class Observation:
    """Latency quantiles and load over the last `window_s` seconds, at the router."""

    window_s: float
    ttft_s: float | None  # the configured quantile of TTFT; None: no first token in the window
    itl_s: float | None  # the configured quantile of ITL; None: no token after a first one in the window
    prompt_tokens_per_s: float  # prompt tokens the router accepted, per second: the prefill pool's load
    streams: float  # requests past their first token at the router, averaged over the window: the decode pool's load

    def latency_s(self, pool: Pool) -> float | None:
        return self.ttft_s if pool == "prefill" else self.itl_s

    def load(self, pool: Pool) -> float:
        return self.prompt_tokens_per_s if pool == "prefill" else self.streams

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "none" if v is None else f"{v:.4f}s"
        return (f"ttft={fmt(self.ttft_s)} itl={fmt(self.itl_s)} prompt_tokens/s={self.prompt_tokens_per_s:.1f} "
                f"streams={self.streams:.2f} window={self.window_s:.0f}s")


class ObservationSource(Protocol):
    def observe(self) -> Observation | None:
        """The latest window; None while there is not yet a whole one to report (e.g. one scrape)."""
        ...


Buckets = Sequence[tuple[float, float]]  # (upper bound `le`, cumulative count), ascending, ending at +Inf


def quantile_from_buckets(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram, as Prometheus' histogram_quantile computes it:
    linear interpolation inside the bucket that holds rank q·count, the first bucket's lower bound
    being 0, a rank in the +Inf bucket answered with the highest finite bound. None: no sample."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if not buckets or not math.isinf(buckets[-1][0]):
        raise ValueError("the buckets must end with the +Inf bucket")
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower  # unreachable for monotonic buckets: the +Inf bucket holds every sample


def bucket_delta(new: Buckets, old: Buckets) -> list[tuple[float, float]]:
    """Per-bucket increase between two scrapes of one histogram (same bounds)."""
    if [b for b, _ in new] != [b for b, _ in old]:
        raise ValueError("the histograms have different buckets")
    return [(bound, n - o) for (bound, n), (_, o) in zip(new, old, strict=True)]
