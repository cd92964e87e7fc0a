"""Where observations come from: Prometheus' HTTP API (histogram_quantile over rate windows), or,
with no Prometheus, the router's own /metrics scraped every interval and diffed over the window."""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from cluster.planner.observation import Buckets, Observation, bucket_delta, quantile_from_buckets

log = logging.getLogger(__name__)

TTFT = "tandem_time_to_first_token_seconds"
ITL = "tandem_inter_token_latency_seconds"
PROMPT_TOKENS = "tandem_prompt_tokens_total"
# the decode pool's load: streams past their first token (requests queued for a prefill are the prefill
# pool's load, seen in its TTFT; counted as decode load they kept a starved cluster from moving workers
# from decode to prefill: bench.sim_planner)
DECODING = "tandem_router_decoding_streams"


def _fetch(url: str, timeout_s: float, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s, context=context) as reply:
        return reply.read().decode()


@dataclass(frozen=True)
class Scrape:
    """The router's counters at one instant (histograms summed over any other labels)."""

    at: float  # time.monotonic()
    ttft: Buckets
    itl: Buckets
    prompt_tokens: float
    decoding: float

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        buckets: dict[str, dict[float, float]] = {TTFT: {}, ITL: {}}
        totals = {PROMPT_TOKENS: 0.0, DECODING: 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                histogram = sample.name.removesuffix("_bucket")
                if sample.name.endswith("_bucket") and histogram in buckets:
                    le = float(sample.labels["le"])
                    buckets[histogram][le] = buckets[histogram].get(le, 0.0) + sample.value
                elif sample.name in totals:
                    totals[sample.name] += sample.value
        for name, found in buckets.items():
            if not found:
                raise ValueError(f"the scrape has no {name} histogram: is this the router's /metrics?")
        return cls(at, sorted(buckets[TTFT].items()), sorted(buckets[ITL].items()), totals[PROMPT_TOKENS],
                   totals[DECODING])


class RouterScrapeSource:
    """Scrapes the router's /metrics at every observe(); reports the difference between the newest
    scrape and the newest one at least a window older (the oldest kept, until a window has passed).
    Invariant: `_history` is in scrape order and spans about one window."""

    def __init__(self, url: str, quantile: float, window_s: float, context: ssl.SSLContext | None = None,
                 timeout_s: float = 5.0) -> None:
        self.url, self.quantile, self.window_s = url, quantile, window_s
        self.context, self.timeout_s = context, timeout_s
        self._history: deque[Scrape] = deque()

    def observe(self) -> Observation | None:
        self.add(Scrape.parse(_fetch(self.url, self.timeout_s, self.context), time.monotonic()))
        return self.observation()

    def add(self, scrape: Scrape) -> None:
        last = self._history[-1] if self._history else None
        if last is not None and (scrape.prompt_tokens < last.prompt_tokens or scrape.itl[-1][1] < last.itl[-1][1]
                                 or scrape.ttft[-1][1] < last.ttft[-1][1]):
            self._history.clear()  # the router restarted: its counters began again
        self._history.append(scrape)
        while len(self._history) > 2 and self._history[1].at <= scrape.at - self.window_s:
            self._history.popleft()

    def observation(self) -> Observation | None:
        if len(self._history) < 2:
            return None
        old, new = self._history[0], self._history[-1]
        try:
            ttft, itl = bucket_delta(new.ttft, old.ttft), bucket_delta(new.itl, old.itl)
        except ValueError:
            self._history = deque([new])
            return None
        span = new.at - old.at
        later = list(self._history)[1:]  # the gauge's samples inside the window
        return Observation(window_s=span, ttft_s=quantile_from_buckets(self.quantile, ttft),
                           itl_s=quantile_from_buckets(self.quantile, itl),
                           prompt_tokens_per_s=(new.prompt_tokens - old.prompt_tokens) / span,
                           streams=sum(s.decoding for s in later) / len(later))


class PrometheusSource:
    """Asks Prometheus (GET /api/v1/query) for the quantiles and the load over the window."""

    def __init__(self, url: str, quantile: float, window_s: float, selector: str = "",
                 timeout_s: float = 5.0) -> None:
        self.url, self.quantile, self.window_s, self.timeout_s = url.rstrip("/"), quantile, window_s, timeout_s
        self.selector = selector

    def queries(self) -> dict[str, str]:
        sel, window = f"{{{self.selector}}}" if self.selector else "", f"{max(round(self.window_s), 1)}s"

        def quantile(histogram: str) -> str:
            return f"histogram_quantile({self.quantile}, sum by (le) (rate({histogram}_bucket{sel}[{window}])))"
        return {"ttft": quantile(TTFT), "itl": quantile(ITL),
                "prompt_tokens_per_s": f"sum(rate({PROMPT_TOKENS}{sel}[{window}]))",
                "streams": f"sum(avg_over_time({DECODING}{sel}[{window}]))"}

    def _scalar(self, query: str) -> float | None:
        """The query's one value; None for an empty vector or NaN (no sample in the window)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        reply = json.loads(_fetch(url, self.timeout_s))
        if reply.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {query!r}: {reply.get('error', reply)}")
        result = reply["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def observe(self) -> Observation | None:
        values = {name: self._scalar(query) for name, query in self.queries().items()}
        return Observation(window_s=self.window_s, ttft_s=values["ttft"], itl_s=values["itl"],
                           prompt_tokens_per_s=values["prompt_tokens_per_s"] or 0.0,
                           streams=values["streams"] or 0.0)
