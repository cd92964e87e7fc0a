"""Prometheus metrics of the router (latency histograms in seconds, per the design contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

REQUESTS = Counter("tandem_requests", "Requests ended at the router, by outcome (ok, or the status code)",
                   ["outcome"])
INFLIGHT = Gauge("tandem_router_inflight_requests", "Requests in flight at the router")
DECODING = Gauge("tandem_router_decoding_streams", "Requests in flight past their first token: the decode "
                 "pool's load (before it, a request waits on a prefill)")
TTFT = Histogram("tandem_time_to_first_token_seconds", "Arrival at the router to the first token sent",
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("tandem_inter_token_latency_seconds", "Time between two streamed chunks, per token",
                buckets=_TOKEN_BUCKETS)
E2E = Histogram("tandem_e2e_request_latency_seconds", "Arrival at the router to the last token",
                buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("tandem_prompt_tokens", "Prompt tokens of requests the router accepted")
GENERATION_TOKENS = Counter("tandem_generation_tokens_router", "Tokens streamed to clients")
ROUTED = Counter("tandem_router_routed", "Requests routed, by pool and worker", ["pool", "worker"])
PREFIX_OVERLAP = Counter("tandem_router_prefix_overlap_blocks", "Prompt blocks the chosen worker already "
                         "held in its prefix cache or its second KV tier (from its KV events), by worker", ["worker"])
CACHED_BLOCKS = Gauge("tandem_router_worker_cached_blocks", "Blocks in a worker's prefix cache, as the router "
                      "knows them from its KV events", ["worker"])
OFFLOADED_BLOCKS = Gauge("tandem_router_worker_offloaded_blocks", "Blocks readable in a worker's second KV tier, "
                         "as the router knows them from its KV events", ["worker"])
BLOCK_COST = Gauge("tandem_router_worker_block_cost", "What a worker measured one block to cost, in blocks of its "
                   "prefill work, by tier: offload (loaded from its second tier) or store (read from the cluster "
                   "KV store, then loaded); kv_aware routing prices held blocks with it", ["worker", "tier"])
STORE_BLOCKS = Gauge("tandem_router_kv_store_blocks", "Blocks readable in a cluster KV store, as the router knows "
                     "them from its events", ["store"])
RETRIES = Counter("tandem_router_retries", "Requests sent again to another decode worker before any token, "
                  "by the error of the first", ["error"])
MIGRATIONS = Counter("tandem_router_migrations", "Streams moved to another decode worker (with the tokens already "
                     "streamed) after theirs failed mid-stream, by the error", ["error"])
DISPATCH = Histogram("tandem_router_dispatch_seconds", "A request's admission at the router (tokenized) to its "
                     "first worker call being sent: the router's own time, routing included",
                     buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
KV_EVENT_BATCHES = Counter("tandem_router_kv_event_batches", "KV-event batches received from all workers")
KV_EVENT_HASHES = Counter("tandem_router_kv_event_hashes", "Block hashes in the KV events received from all "
                          "workers, by change (stored, removed, snapshot)", ["change"])
WORKERS = Gauge("tandem_router_workers", "Workers the router routes to, by pool (prefill, decode, both)", ["pool"])
