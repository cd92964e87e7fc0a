"""Helpers for the planner's tests: /metrics text shaped like the router's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


def router_metrics_text(itl: list[float], ttft: list[float], prompt_tokens: int, decoding: int) -> str:
    """/metrics text with the router's planner inputs (cluster/router_metrics.py), holding these samples."""
    registry = CollectorRegistry()
    itl_h = Histogram("tandem_inter_token_latency_seconds", "", buckets=(0.005, 0.01, 0.02, 0.04), registry=registry)
    ttft_h = Histogram("tandem_time_to_first_token_seconds", "", buckets=(0.1, 0.5, 1.0), registry=registry)
    for v in itl:
        itl_h.observe(v)
    for v in ttft:
        ttft_h.observe(v)
    Counter("tandem_prompt_tokens", "", registry=registry).inc(prompt_tokens)
    Gauge("tandem_router_decoding_streams", "", registry=registry).set(decoding)
    return generate_latest(registry).decode()
