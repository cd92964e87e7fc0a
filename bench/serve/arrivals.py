"""When sessions start: a Poisson process (`burstiness` 1) or a gamma process (shape `burstiness`:
below 1 burstier, above 1 more regular) at `rate` per second, or all at once (rate = inf) with a
concurrency cap applied by the runner."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of `count` sessions begins."""
    if count <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * count
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]
