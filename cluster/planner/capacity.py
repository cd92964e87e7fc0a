"""A capacity profile: what one worker of each pool can do, measured by `tandem profile`
(cluster.planner.profiler) and kept as a JSON file the planner loads. Measured values, not config.

  prefill: prompt tokens per second one prefill worker computes
  decode:  at rising batch sizes (concurrent streams per decode worker), the ITL quantiles and
           the tokens per second of one decode worker
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

VERSION = 1


@dataclass(frozen=True)
class DecodePoint:
    batch: float  # concurrent streams per decode worker
    itl_s: dict[str, float]  # ITL quantile ("0.5", "0.9", "0.99") → seconds
    tokens_per_s: float  # per decode worker

    def itl_at(self, quantile: float) -> float:
        """The recorded quantile nearest to `quantile`."""
        key = min(self.itl_s, key=lambda k: abs(float(k) - quantile))
        return self.itl_s[key]


@dataclass(frozen=True)
class CapacityProfile:
    prefill_tokens_per_s: float | None = None  # per prefill worker; None: not measured
    decode: tuple[DecodePoint, ...] = ()  # ascending batch
    meta: dict[str, str] = field(default_factory=dict)  # model, target, date: for people, not the planner

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s is not None and not self.prefill_tokens_per_s > 0:
            raise ValueError("prefill_tokens_per_s must be > 0")
        batches = [p.batch for p in self.decode]
        if batches != sorted(set(batches)) or any(b <= 0 for b in batches):
            raise ValueError("decode points need distinct positive batch sizes in ascending order")
        if any(not p.itl_s or min(p.itl_s.values()) <= 0 for p in self.decode):
            raise ValueError("every decode point needs positive ITL quantiles")

    # -- decode -------------------------------------------------------------------------------------
    def decode_itl_s(self, batch: float, quantile: float) -> float | None:
        """Profiled ITL of one worker running `batch` streams: linear between points, the first
        point's below it, extrapolated along the last segment above the last point."""
        points = [(p.batch, p.itl_at(quantile)) for p in self.decode]
        if not points:
            return None
        if batch <= points[0][0]:
            return points[0][1]
        if len(points) == 1:
            return points[0][1] * batch / points[0][0]  # one point: assume ITL grows with the batch
        for (b0, t0), (b1, t1) in itertools.pairwise(points):
            if batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = points[-2], points[-1]
        return t1 + max(t1 - t0, 0.0) * (batch - b1) / (b1 - b0)

    def decode_streams_within(self, itl_target_s: float, quantile: float) -> float | None:
        """Streams one decode worker holds with its ITL quantile at or under the target (interpolated
        between profiled points; the largest profiled batch if all meet it; None: no profile)."""
        points = [(p.batch, p.itl_at(quantile)) for p in self.decode]
        if not points:
            return None
        if points[0][1] > itl_target_s:
            return points[0][0] * itl_target_s / points[0][1]  # even the smallest batch misses: scale it down
        best = points[0][0]
        for (b0, t0), (b1, t1) in itertools.pairwise(points):
            if t1 <= itl_target_s:
                best = b1
                continue
            return b0 + (b1 - b0) * (itl_target_s - t0) / (t1 - t0)  # t0 <= target < t1
        return best

    # -- files --------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CapacityProfile:
        raw = json.loads(text)
        if raw.get("version") != VERSION:
            raise ValueError(f"capacity profile version {raw.get('version')!r}, expected {VERSION}")
        points = tuple(DecodePoint(float(p["batch"]), {str(k): float(v) for k, v in p["itl_s"].items()},
                                   float(p["tokens_per_s"])) for p in raw.get("decode", ()))
        prefill = raw.get("prefill_tokens_per_s")
        return cls(None if prefill is None else float(prefill), points, dict(raw.get("meta", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CapacityProfile:
        return cls.from_json(Path(path).read_text())
