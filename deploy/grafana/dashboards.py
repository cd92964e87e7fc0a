"""Tandem's Grafana dashboards as code (grafana-foundation-sdk, Grafana 11.6).

    python deploy/grafana/dashboards.py          # writes deploy/grafana/<uid>.json
    python deploy/grafana/dashboards.py --check  # exit 1 if a committed file differs

tests/test_dashboards.py regenerates them and requires the committed JSON to be identical, and
tests/test_observability.py runs every panel query against a real Prometheus scraping a cluster.

Every query goes to the data source picked in the `datasource` variable and filters on the
`namespace` label (one Tandem cluster per namespace: the label the rules in deploy/prometheus/
aggregate by). Latency quantiles and SLO error ratios come from those recording rules; the SLO
lines are the rules' objectives (checked against the rule files by tests/test_dashboards.py).
Per-pool worker gauges take the pool from the worker id (`<role>-...`: the pod names of the
prefill/decode Deployments and `tandem up`'s default ids).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models

HERE = Path(__file__).resolve().parent

# The SLOs of deploy/prometheus/rules/tandem-slo.rules.yml (bucket boundaries of the histograms).
TTFT_SLO_S = 1.0
ITL_SLO_S = 0.1
SLO_ERROR_BUDGET = 0.01  # objective 99%
FAST_BURN_RATE = 14.4  # the page-level burn rate of the 1 h window
# Thresholds of deploy/prometheus/rules/tandem-alerts.rules.yml.
KV_NEARLY_FULL_RATIO = 0.95
KV_TRANSFER_FAILED_RATIO = 0.05

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
POOL_FROM_WORKER = '"pool", "$1", "worker", "(prefill|decode|both)-.*"'


def by_pool(selector: str) -> str:
    """A worker gauge labelled with its pool (from the worker id), summed per pool."""
    return f"sum by (pool) (label_replace({selector}, {POOL_FROM_WORKER}))"


def share(by: str, part: str, whole: str) -> str:
    """rate(part) / rate(whole) per `by`; 0, not "no data", while `part` has no series yet (a
    labelled counter appears with its first increment)."""
    whole_rate = f"sum by ({by}) (rate({whole}[{RATE}]))"
    return f"(sum by ({by}) (rate({part}[{RATE}])) or 0 * {whole_rate}) / {whole_rate}"


@dataclass
class Query:
    expr: str
    legend: str


@dataclass
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: list[Query]
    thresholds: list[tuple[float, str]] = field(default_factory=list)  # (value, color): drawn as dashed lines
    stacked: bool = False
    width: int = 12


def _panel(spec: PanelSpec, panel_id: int) -> timeseries.Panel:
    panel = (timeseries.Panel().id(panel_id).title(spec.title).description(spec.description).unit(spec.unit)
             .datasource(DATASOURCE).span(spec.width).height(8).min(0).fill_opacity(10)
             .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
        panel.with_target(prometheus.Dataquery().ref_id(ref).datasource(DATASOURCE).expr(query.expr)
                          .legend_format(query.legend).range())
    if spec.thresholds:
        steps = [models.Threshold(value=None, color="green"),
                 *(models.Threshold(value=value, color=color) for value, color in spec.thresholds)]
        panel.thresholds(builders.ThresholdsConfig().mode(models.ThresholdsMode.ABSOLUTE).steps(steps))
        panel.thresholds_style(common_builders.GraphThresholdsStyleConfig()
                               .mode(common.GraphThresholdsStyleMode.DASHED))
    if spec.stacked:
        panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
    return panel


def _variables() -> list[builders.DatasourceVariable | builders.QueryVariable]:
    return [
        builders.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        builders.QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
        .description("Tandem clusters: one per Kubernetes namespace")
        .query("label_values(tandem_router_inflight_requests, namespace)")
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*"),
    ]


def _dashboard(uid: str, title: str, description: str, rows: list[tuple[str, list[PanelSpec]]]) -> dict:
    dashboard = (builders.Dashboard(title).uid(uid).description(description).tags(["tandem"])
                 .time("now-1h", "now").refresh("30s").timezone("browser").readonly()
                 .tooltip(models.DashboardCursorSync.CROSSHAIR))
    for variable in _variables():
        dashboard.with_variable(variable)
    panel_id = 0
    for row_title, specs in rows:
        panel_id += 1
        dashboard.with_row(builders.Row(row_title).id(panel_id))
        for spec in specs:
            panel_id += 1
            dashboard.with_panel(_panel(spec, panel_id))
    return json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))


def _quantiles(recorded: str) -> list[Query]:
    return [Query(f'max by (namespace) (tandem:{recorded}:p{q}_rate2m{{{NS}}})', f"p{q} {{{{namespace}}}}")
            for q in (50, 90, 99)]


def _histogram_quantiles(metric: str, by: str = "namespace") -> list[Query]:
    return [Query(f"histogram_quantile({q / 100}, sum by ({by}, le) (rate({metric}_bucket{{{NS}}}[{RATE}])))",
                  f"p{q} " + " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")))
            for q in (50, 90, 99)]


def service_dashboard() -> dict:
    ttft_bucket = f'tandem_time_to_first_token_seconds_bucket{{le=~"1(\\\\.0)?", {NS}}}'
    requests = [
        PanelSpec("Requests by outcome", "Requests ended at the router per second: ok, cancelled (the client "
                  "left), or the gRPC status of the failure.", "reqps",
                  [Query(f"sum by (outcome) (rate(tandem_requests_total{{{NS}}}[{RATE}]))", "{{outcome}}")],
                  stacked=True),
        PanelSpec("Error ratio", "Share of ended requests that failed (neither ok nor cancelled by the client).",
                  "percentunit",
                  [Query(share("namespace", f'tandem_requests_total{{outcome!~"ok|cancelled", {NS}}}',
                               f"tandem_requests_total{{{NS}}}"), "{{namespace}}")]),
        PanelSpec("Requests in flight", "Requests the routers are serving now (over --max-inflight: 429), and "
                  "those past their first token (decoding: the decode pool's load, as the planner reads it).",
                  "short", [Query(f"sum by (namespace) (tandem_router_inflight_requests{{{NS}}})", "{{namespace}}"),
                            Query(f"sum by (namespace) (tandem_router_decoding_streams{{{NS}}})",
                                  "decoding {{namespace}}")]),
        PanelSpec("Tokens", "Prompt tokens accepted and tokens streamed to clients, per second, at the routers.",
                  "short",
                  [Query(f"sum by (namespace) (rate(tandem_prompt_tokens_total{{{NS}}}[{RATE}]))", "prompt"),
                   Query(f"sum by (namespace) (rate(tandem_generation_tokens_router_total{{{NS}}}[{RATE}]))",
                         "generated")]),
    ]
    latency = [
        PanelSpec("Time to first token", f"p50/p90/p99 over 2 m (recording rules); dashed: the SLO, "
                  f"{TTFT_SLO_S:g} s for {1 - SLO_ERROR_BUDGET:.0%} of requests.", "s",
                  _quantiles("time_to_first_token_seconds"), thresholds=[(TTFT_SLO_S, "red")], width=8),
        PanelSpec("Inter-token latency", f"p50/p90/p99 over 2 m (recording rules); dashed: the SLO, "
                  f"{ITL_SLO_S * 1000:g} ms for {1 - SLO_ERROR_BUDGET:.0%} of token gaps.", "s",
                  _quantiles("inter_token_latency_seconds"), thresholds=[(ITL_SLO_S, "red")], width=8),
        PanelSpec("End-to-end latency", "Arrival at the router to the last token, p50/p90/p99 (no SLO in the "
                  "rules: it grows with the answer's length).", "s",
                  _histogram_quantiles("tandem_e2e_request_latency_seconds"), width=8),
        PanelSpec("Share missing the SLOs", f"Requests over the TTFT SLO and token gaps over the ITL SLO, over "
                  f"5 m and 1 h (recording rules); dashed: the error budget, {SLO_ERROR_BUDGET:.0%}.",
                  "percentunit",
                  [Query(f"tandem:ttft_slo_errors:ratio_rate5m{{{NS}}}", "TTFT 5m {{namespace}}"),
                   Query(f"tandem:ttft_slo_errors:ratio_rate1h{{{NS}}}", "TTFT 1h {{namespace}}"),
                   Query(f"tandem:itl_slo_errors:ratio_rate5m{{{NS}}}", "ITL 5m {{namespace}}"),
                   Query(f"tandem:itl_slo_errors:ratio_rate1h{{{NS}}}", "ITL 1h {{namespace}}")],
                  thresholds=[(SLO_ERROR_BUDGET, "red")]),
        PanelSpec("Error budget burn rate (1 h)", f"How many times faster than allowed the 30-day budget burns; "
                  f"dashed: {FAST_BURN_RATE:g}, where the fast-burn alerts page (with the 5 m window).", "x",
                  [Query(f"tandem:ttft_slo_errors:ratio_rate1h{{{NS}}} / {SLO_ERROR_BUDGET}", "TTFT {{namespace}}"),
                   Query(f"tandem:itl_slo_errors:ratio_rate1h{{{NS}}} / {SLO_ERROR_BUDGET}", "ITL {{namespace}}")],
                  thresholds=[(FAST_BURN_RATE, "red")]),
    ]
    goodput = [
        PanelSpec("Goodput", f"Requests per second whose first token came within the TTFT SLO "
                  f"({TTFT_SLO_S:g} s), beside all requests that got a first token. The histograms do not join "
                  "TTFT and ITL per request: this bounds goodput from above.", "reqps",
                  [Query(f"sum by (namespace) (rate({ttft_bucket}[{RATE}]))", "within TTFT SLO {{namespace}}"),
                   Query(f"sum by (namespace) (rate(tandem_time_to_first_token_seconds_count{{{NS}}}[{RATE}]))",
                         "all {{namespace}}")]),
        PanelSpec("Token goodput", f"Streamed tokens per second, and those whose gap to the previous one met the "
                  f"ITL SLO ({ITL_SLO_S * 1000:g} ms; a chunk's gap is split evenly over its tokens).", "short",
                  [Query(f"sum by (namespace) (rate(tandem_generation_tokens_router_total{{{NS}}}[{RATE}])) * (1 - "
                         f"tandem:itl_slo_errors:ratio_rate5m{{{NS}}})", "within ITL SLO {{namespace}}"),
                   Query(f"sum by (namespace) (rate(tandem_generation_tokens_router_total{{{NS}}}[{RATE}]))",
                         "all {{namespace}}")]),
    ]
    keys = [
        PanelSpec("Requests by API key", "Requests ended per second, by API key name (`anonymous` without API "
                  "keys) and outcome; key_limit: refused by the key's limits (--api-key-limits).", "reqps",
                  [Query(f"sum by (key, outcome) (rate(tandem_router_key_requests_total{{{NS}}}[{RATE}]))",
                         "{{key}} {{outcome}}")], width=8),
        PanelSpec("Tokens by API key", "Prompt and generated tokens per second, by API key name (what "
                  "tokens_per_minute limits).", "short",
                  [Query(f"sum by (key, kind) (rate(tandem_router_key_tokens_total{{{NS}}}[{RATE}]))",
                         "{{key}} {{kind}}")], width=8),
        PanelSpec("Requests in flight by API key", "Requests each key has in flight now (what max_inflight limits).",
                  "short", [Query(f"sum by (key) (tandem_router_key_inflight_requests{{{NS}}})", "{{key}}")], width=8),
    ]
    return _dashboard("tandem-service", "Tandem / Service", "Requests, latency against the SLOs, goodput, API keys.",
                      [("Requests", requests), ("Latency and SLOs", latency), ("Goodput", goodput),
                       ("API keys", keys)])


def pools_dashboard() -> dict:
    pools = [
        PanelSpec("Workers per pool", "Workers the routers route to, per pool (from etcd; the routers agree).",
                  "short", [Query(f"max by (pool) (tandem_router_workers{{{NS}}})", "{{pool}}")], width=6),
        PanelSpec("Waiting sequences", "Sequences queued for a batch slot, per pool.", "short",
                  [Query(by_pool(f"tandem_waiting_sequences{{{NS}}}"), "{{pool}}")], width=6),
        PanelSpec("Running sequences", "Sequences in the running batches, per pool.", "short",
                  [Query(by_pool(f"tandem_running_sequences{{{NS}}}"), "{{pool}}")], width=6),
        PanelSpec("Waiting for remote KV", "Decode sequences parked until their remote prefill lands.", "short",
                  [Query(by_pool(f"tandem_remote_kv_waiting_sequences{{{NS}}}"), "{{pool}}")], width=6),
        PanelSpec("KV cache usage", f"Share of KV blocks in use, per worker and averaged per pool; dashed: "
                  f"{KV_NEARLY_FULL_RATIO:.0%}, where TandemKVCacheNearlyFull fires after 10 m.", "percentunit",
                  [Query(f"max by (worker) (tandem_kv_cache_usage_ratio{{{NS}}})", "{{worker}}"),
                   Query(f"avg by (pool) (label_replace(tandem_kv_cache_usage_ratio{{{NS}}}, {POOL_FROM_WORKER}))",
                         "{{pool}} mean")],
                  thresholds=[(KV_NEARLY_FULL_RATIO, "red")]),
        PanelSpec("Free KV blocks", "Blocks free per worker, evictable cached ones included.", "short",
                  [Query(f"max by (worker) (tandem_kv_free_blocks{{{NS}}})", "{{worker}}")], width=6),
        PanelSpec("Preemptions", "Sequences preempted per second to make room in the KV cache (recomputed "
                  "later): a steady rate means the cache is too small for the batch.", "short",
                  [Query(f"sum by (worker) (rate(tandem_preemptions_total{{{NS}}}[{RATE}]))", "{{worker}}")],
                  width=6),
        PanelSpec("Worker calls by outcome", "Generate (decode) and Prefill calls that ended on the workers, "
                  "per second: ok, or the gRPC status (resource_exhausted: the worker's queue was full).", "reqps",
                  [Query(f"sum by (rpc, outcome) (rate(tandem_worker_requests_total{{{NS}}}[{RATE}]))",
                         "{{rpc}} {{outcome}}")], stacked=True),
        PanelSpec("Generated tokens per worker", "Tokens each decode (or aggregated) worker generated, per second.",
                  "short", [Query(f"sum by (worker) (rate(tandem_generation_tokens_total{{{NS}}}[{RATE}]))",
                                  "{{worker}}")]),
        PanelSpec("Speculative decoding: drafts", "Workers with a draft model (--speculative-model): draft tokens "
                  "proposed and accepted per second, the moving acceptance ratio and the drafts per sequence of "
                  "the last step (0: off).", "short",
                  [Query(f"sum by (worker, result) (rate(tandem_spec_draft_tokens_total{{{NS}}}[{RATE}]))",
                         "{{result}} {{worker}}"),
                   Query(f"max by (worker) (tandem_spec_acceptance_ratio{{{NS}}})", "acceptance {{worker}}"),
                   Query(f"max by (worker) (tandem_spec_draft_length{{{NS}}})", "drafts/step {{worker}}")], width=6),
        PanelSpec("Speculative decoding: decisions", "Steps per second by the controller's decision (on: "
                  "predicted to raise tokens/s; probe: measuring; off) and the gain it last predicted; off at high "
                  "concurrency is intended.", "short",
                  [Query(f"sum by (decision) (rate(tandem_spec_steps_total{{{NS}}}[{RATE}]))", "{{decision}}"),
                   Query(f"max by (worker) (tandem_spec_predicted_gain{{{NS}}})", "predicted gain {{worker}}")],
                  width=6),
    ]
    routing = [
        PanelSpec("Prefix cache hit rate", "Share of prefilled prompt tokens the worker's prefix cache served.",
                  "percentunit",
                  [Query(share("worker", f'tandem_prefill_tokens_total{{kind="cached", {NS}}}',
                               f"tandem_prefill_tokens_total{{{NS}}}"), "{{worker}}")]),
        PanelSpec("Prefix cache lookups by tier", "Prompt blocks of admitted requests looked up per second: in "
                  "the worker's pool, then in its second tier (--kv-offload-gib) for the pool's misses; an offload "
                  "hit is loaded, not computed.", "short",
                  [Query(f"sum by (tier, result) (rate(tandem_prefix_cache_blocks_total{{{NS}}}[{RATE}]))",
                         "{{tier}} {{result}}")], stacked=True, width=6),
        PanelSpec("Second KV tier traffic", "Bytes per second copied into each worker's second tier (store, off "
                  "the step) and back into its pool (load).", "Bps",
                  [Query(f"sum by (worker, op) (rate(tandem_kv_offload_bytes_total{{{NS}}}[{RATE}]))",
                         "{{worker}} {{op}}")], width=6),
        PanelSpec("Second KV tier copy time", "Mean seconds to copy one block into the second tier (store) and "
                  "back into the pool (load), per worker.", "s",
                  [Query(f"sum by (worker, op) (rate(tandem_kv_offload_seconds_total{{{NS}}}[{RATE}])) / "
                         f'clamp_min(sum by (worker, op) (rate(tandem_kv_offload_blocks_total{{op=~"store|load", '
                         f"{NS}}}[{RATE}])), 1e-9)", "{{worker}} {{op}}")], width=6),
        PanelSpec("Second KV tier capacity", "Blocks in each worker's second tier and its capacity; blocks "
                  "evicted (least recently used) and dropped (no free slot) per second.", "short",
                  [Query(f"max by (worker) (tandem_kv_offload_used_blocks{{{NS}}})", "used {{worker}}"),
                   Query(f"max by (worker) (tandem_kv_offload_capacity_blocks{{{NS}}})", "capacity {{worker}}"),
                   Query(f'sum by (worker, op) (rate(tandem_kv_offload_blocks_total{{op=~"evict|drop", {NS}}}'
                         f"[{RATE}]))", "{{op}}/s {{worker}}")], width=6),
        PanelSpec("Cluster KV store: workers' traffic", "Blocks per second the workers read from the cluster KV "
                  "stores before admitting a prompt (get: hit, miss, corrupt, failed: the last three are computed) "
                  "and put into them (stored, present, rejected, failed).", "short",
                  [Query(f"sum by (op, outcome) (rate(tandem_kv_store_blocks_total{{{NS}}}[{RATE}]))",
                         "{{op}} {{outcome}}")], stacked=True, width=6),
        PanelSpec("Cluster KV store bytes", "Bytes per second the workers read from the cluster KV stores (get) "
                  "and wrote into them (put), per worker.", "Bps",
                  [Query(f"sum by (worker, op) (rate(tandem_kv_store_bytes_total{{{NS}}}[{RATE}]))",
                         "{{worker}} {{op}}")], width=6),
        PanelSpec("Cluster KV store exchange time", "Seconds of one exchange with the stores, p50/p90/p99 by op: "
                  "get (lookups, reads, checksums: what it adds to a prompt's TTFT) and put (in the background).",
                  "s", _histogram_quantiles("tandem_kv_store_seconds", by="op"), width=6),
        PanelSpec("Cluster KV store capacity", "Blocks readable and reserved (being written) in each store, its "
                  "capacity; blocks evicted (least recently used, not under a read lease) and reservations lapsed "
                  "(a writer that never committed) per second.", "short",
                  [Query(f"max by (store, state) (tandem_kvstore_used_blocks{{{NS}}})", "{{state}} {{store}}"),
                   Query(f"max by (store) (tandem_kvstore_capacity_blocks{{{NS}}})", "capacity {{store}}"),
                   Query(f'sum by (store, op) (rate(tandem_kvstore_blocks_total{{op=~"evict|lapse", {NS}}}'
                         f"[{RATE}]))", "{{op}}/s {{store}}")], width=6),
        PanelSpec("Cluster KV store hit rate", "Share of the blocks looked up in each store that it held.",
                  "percentunit",
                  [Query(share("store", f'tandem_kvstore_lookup_blocks_total{{result="hit", {NS}}}',
                               f"tandem_kvstore_lookup_blocks_total{{{NS}}}"), "{{store}}")], width=6),
        PanelSpec("Cluster KV store memory", "Bytes of blocks readable and reserved in each store.", "bytes",
                  [Query(f"max by (store, state) (tandem_kvstore_used_blocks{{{NS}}}) * on (store) group_left "
                         f"max by (store) (tandem_kvstore_block_bytes{{{NS}}})", "{{state}} {{store}}")], width=6),
        PanelSpec("Cluster KV store calls", "KVStore calls the stores answered per second, by call and outcome "
                  "(failed_precondition: another model's blocks), and the stores each worker uses.", "short",
                  [Query(f"sum by (call, outcome) (rate(tandem_kvstore_calls_total{{{NS}}}[{RATE}]))",
                         "{{call}} {{outcome}}"),
                   Query(f"sum by (worker) (tandem_kv_store_known{{{NS}}})", "stores used by {{worker}}")], width=6),
        PanelSpec("Block prices at routing", "What each worker measured a held block to cost, in blocks of its "
                  "prefill work (below 1: cheaper than computing it), by tier; and blocks the routers know in "
                  "each cluster KV store. kv_aware routing prices prompts with them.", "short",
                  [Query(f"max by (worker, tier) (tandem_router_worker_block_cost{{{NS}}})", "{{tier}} {{worker}}"),
                   Query(f"max by (store) (tandem_router_kv_store_blocks{{{NS}}})", "store blocks {{store}}")]),
        PanelSpec("Prefix overlap at routing", "Prompt blocks per second the chosen worker already held (from its "
                  "KV events), and blocks each worker's cache and second KV tier hold as the routers know them.",
                  "short",
                  [Query(f"sum by (worker) (rate(tandem_router_prefix_overlap_blocks_total{{{NS}}}[{RATE}]))",
                         "reused/s {{worker}}"),
                   Query(f"max by (worker) (tandem_router_worker_cached_blocks{{{NS}}})", "cached {{worker}}"),
                   Query(f"max by (worker) (tandem_router_worker_offloaded_blocks{{{NS}}})",
                         "offloaded {{worker}}")]),
        PanelSpec("KV events received", "KV-event batches, and block hashes stored and removed in them, that the "
                  "routers received from all workers per second.", "short",
                  [Query(f"sum (rate(tandem_router_kv_event_batches_total{{{NS}}}[{RATE}]))", "batches/s"),
                   Query(f"sum by (change) (rate(tandem_router_kv_event_hashes_total{{{NS}}}[{RATE}]))",
                         "hashes {{change}}/s")]),
        PanelSpec("Router dispatch time", "A request's admission at the router (tokenized) to its first "
                  "worker call: the router's own time, routing included, p50/p90/p99.", "s",
                  _histogram_quantiles("tandem_router_dispatch_seconds")),
        PanelSpec("Routed requests", "Requests the routers sent to each worker, per second.", "reqps",
                  [Query(f"sum by (pool, worker) (rate(tandem_router_routed_total{{{NS}}}[{RATE}]))",
                         "{{pool}} {{worker}}")], stacked=True),
        PanelSpec("Disaggregation decisions", "Where decode workers prefilled prompts: remote (on a prefill "
                  "worker) or locally, and why.", "reqps",
                  [Query(f"sum by (decision) (rate(tandem_disaggregation_decisions_total{{{NS}}}[{RATE}]))",
                         "{{decision}}")], stacked=True),
        PanelSpec("Retries and migrations", "Requests sent to another decode worker before their first token "
                  "(retry) or mid-stream (migration), by the error.", "reqps",
                  [Query(f"sum by (error) (rate(tandem_router_retries_total{{{NS}}}[{RATE}]))", "retry {{error}}"),
                   Query(f"sum by (error) (rate(tandem_router_migrations_total{{{NS}}}[{RATE}]))",
                         "migration {{error}}")]),
        PanelSpec("Remote prefill failures", "Remote prefill attempts that failed on decode workers, by error "
                  "(the worker tries the next prefill worker, then prefills itself).", "reqps",
                  [Query(f"sum by (error) (rate(tandem_remote_prefill_failures_total{{{NS}}}[{RATE}]))",
                         "{{error}}")]),
    ]
    transfer = [
        PanelSpec("KV transfer throughput", "Bytes per second moved by completed transfer batches.", "Bps",
                  [Query(f"sum by (backend, op) (rate(tandem_kv_transfer_bytes_total{{{NS}}}[{RATE}]))",
                         "{{backend}} {{op}}")], width=8),
        PanelSpec("KV transfer latency", "Submit-to-completion time of successful batches, p50/p90/p99.", "s",
                  _histogram_quantiles("tandem_kv_transfer_seconds", by="backend"), width=8),
        PanelSpec("KV transfer failures", f"Share of transfer batches that failed, failures by error type, and "
                  f"links refused for want of the cluster's KV secret or a unit's integrity tag, and batches "
                  f"refused for want of a grant; dashed: {KV_TRANSFER_FAILED_RATIO:.0%}, "
                  f"where TandemKVTransferFailures fires after 5 m.",
                  "percentunit",
                  [Query(share("backend", f'tandem_kv_transfer_batches_total{{outcome="failed", {NS}}}',
                               f"tandem_kv_transfer_batches_total{{{NS}}}"), "failed share {{backend}}"),
                   Query(f"sum by (backend, error) (rate(tandem_kv_transfer_failures_total{{{NS}}}[{RATE}]))",
                         "{{backend}} {{error}} /s"),
                   Query(f"sum by (reason) (rate(tandem_kv_link_refused_total{{{NS}}}[{RATE}]))",
                         "refused link {{reason}} /s"),
                   Query(f"sum by (reason) (rate(tandem_kv_grant_refused_total{{{NS}}}[{RATE}]))",
                         "refused batch {{reason}} /s")],
                  thresholds=[(KV_TRANSFER_FAILED_RATIO, "red")], width=8),
        PanelSpec("KV pushed per tensor-parallel link", "Bytes per second prefill workers' ranks pushed, by the "
                  "sending rank and the decode rank they went to: each rank sends only its KV heads, so the links "
                  "of a group carry equal shares and none passes through rank 0 (0 -> 0 alone between single-rank "
                  "workers).", "Bps",
                  [Query(f"sum by (source_rank, dest_rank) (rate(tandem_kv_pushed_bytes_total{{{NS}}}[{RATE}]))",
                         "rank {{source_rank}} -> {{dest_rank}}")], width=8),
        PanelSpec("Remote prefill phases", "Decode workers' successful remote prefills, p50/p90/p99 by phase: rpc "
                  "(the prompt computed, its KV pushed meanwhile) and kv_tail (after the call, until every page "
                  "landed).", "s", _histogram_quantiles("tandem_remote_prefill_seconds", by="phase"), width=8),
        PanelSpec("KV links by protection", "Peer-link connections opened or admitted per second, by what protects "
                  "them: tls (mutual TLS, the --tls-* files), sealed (the KV secret, every byte tagged), frames "
                  "(the secret, frames tagged) or open (nothing: only on a trusted network).", "ops",
                  [Query(f"sum by (protection) (rate(tandem_kv_links_opened_total{{{NS}}}[{RATE}]))",
                         "{{protection}} /s")], width=8),
    ]
    planner = [
        PanelSpec("Replicas: desired and current", "What the planner wants per pool, what the pool has, and the "
                  "planner's bounds.", "short",
                  [Query(f"max by (pool) (tandem_planner_desired_replicas{{{NS}}})", "desired {{pool}}"),
                   Query(f"max by (pool) (tandem_planner_current_replicas{{{NS}}})", "current {{pool}}"),
                   Query(f"max by (pool) (tandem_planner_min_replicas{{{NS}}})", "min {{pool}}"),
                   Query(f"max by (pool) (tandem_planner_max_replicas{{{NS}}})", "max {{pool}}")]),
        PanelSpec("Planner decisions", "Planner decisions per pool, by action and reason, per second.", "short",
                  [Query(f"sum by (pool, action, reason) (rate(tandem_planner_decisions_total{{{NS}}}[{RATE}]))",
                         "{{pool}} {{action}} ({{reason}})")], stacked=True),
    ]
    return _dashboard("tandem-pools", "Tandem / Pools", "Prefill and decode pools: load, KV cache, prefix "
                      "cache and routing, KV transfer, the planner.",
                      [("Pools", pools), ("Prefix cache and routing", routing), ("KV transfer", transfer),
                       ("Planner", planner)])


def dashboards() -> dict[str, dict]:
    """File name → dashboard JSON model."""
    return {f"{d['uid']}.json": d for d in (service_dashboard(), pools_dashboard())}


def render(model: dict) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 where a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, model in dashboards().items():
        path = HERE / name
        text = render(model)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/grafana/dashboards.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
