"""Summaries of one run: latency percentiles (ms), throughput, and goodput as DistServe defines it
(requests per second that met both the TTFT and the TPOT objective)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.serve.client import RequestResult


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok or r.ttft is None:
            return False
        tpot = r.tpot
        return r.ttft * 1e3 <= self.ttft_ms and (tpot is None or tpot * 1e3 <= self.tpot_ms)


def _stats(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(values_s) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: list[RequestResult], duration_s: float, slo: SLO) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    met = sum(1 for r in ok if slo.met_by(r))
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s if duration_s > 0 else 0.0,
        "prompt_tokens": prompt, "output_tokens": sum(r.output_tokens for r in ok),
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok if r.e2e is not None]),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "slo_met": met,
        "goodput_rps": met / duration_s if duration_s > 0 else 0.0,
    }
