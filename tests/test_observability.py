"""The dashboards and the Prometheus rules against live data: a real Prometheus (127.0.0.1, 1 s
scrapes and rule evaluations, the repository's rule files) scrapes a 1 prefill + 1 decode cluster
with its planner (pools pinned at one worker each) while a bounded load runs; then every panel
query of deploy/grafana/*.json and every rule expression goes through Prometheus's HTTP API. Each
must parse and return data with a finite value, except where EMPTY_ALLOWED says why it may be
empty (a fault counter before its first fault; an alert that does not fire): those must parse and
read only metrics the components expose. The metric families the router, the workers and the
planner expose are exactly those docs/metrics.md lists."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import yaml

from bench.scrape import router_metrics
from common.etcd.local import free_port
from common.processes import spawn
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import Cluster, fetch, tandem_up, worker_metrics
from tests.support.observability import (
    RULE_FILES,
    committed_dashboards,
    documented_families,
    exposed_families,
    metric_names,
    panel_queries,
    rules,
    sample_labels,
)

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed "
                                                   "(scripts/setup.sh installs Debian's prometheus package)")]
NAMESPACE = "tandem-test"
# Grafana's variables: the namespace the scrape configuration below sets; a rate window that covers
# the whole load (Grafana's $__rate_interval is at least 4 scrape intervals).
VARIABLES = {"$namespace": NAMESPACE, "$__rate_interval": "1m"}
# Queries that may return nothing here, by the metric that makes them empty, and why.
EMPTY_ALLOWED = {
    "tandem_router_retries_total": "no decode worker fails or refuses: no series before the first retry",
    "tandem_router_migrations_total": "no decode worker fails mid-stream: no series before the first migration",
    "tandem_remote_prefill_failures_total": "no remote prefill fails: no series before the first failure",
    "tandem_kv_transfer_failures_total": "no transfer fails: no series before the first failure",
    "tandem_kv_link_refused_total": "every link authenticates: no series before the first refusal",
    "tandem_kv_grant_refused_total": "every batch stays in its grant: no series before the first refusal",
}
ALERTS_EMPTY_ALLOWED = "an alert's expression is empty while it does not fire (it may fire here: slow CPUs)"
SHARED_PREFIX = list(range(10, 58))  # 48 tokens: 3 full blocks the prefix cache serves after the first request


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as e:  # 400 / 422 carry the error as JSON
            return json.load(e)

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)


def planner_url(cluster: Cluster) -> str:
    assert cluster.planner is not None, "tandem up announced no planner"
    port = cluster.planner.metrics_port
    return f"127.0.0.1:{port}"


def _config(cluster: Cluster) -> dict[str, Any]:
    def job(name: str, *targets: str) -> dict[str, Any]:
        return {"job_name": name, "static_configs": [{"targets": list(targets), "labels": {"namespace": NAMESPACE}}]}
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [job("tandem-router", urllib.parse.urlparse(cluster.http_url).netloc),
                           job("tandem-workers", *(f"127.0.0.1:{w.metrics_port}" for w in cluster.workers)),
                           job("tandem-kvstores", *(f"127.0.0.1:{s.metrics_port}" for s in cluster.kv_stores)),
                           job("tandem-planner", planner_url(cluster))],
    }


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    pinned = [f"--{b}-{pool}-workers=1" for b in ("min", "max") for pool in ("prefill", "decode")]
    with tandem_up("--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--num-kv-blocks", "128", "--min-remote-prefill-tokens", "16", "--planner", "true", *pinned,
                   "--kv-offload-gib", "0.01", "--kv-store", "1", "--speculative-model", "self-int4",
                   "--planner-interval-s", "1", "--planner-window-s", "2") as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus as a child that the kernel kills with this process, stopped by its pid after."""
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(_config(cluster)))
    port = free_port()
    with (tmp / "prometheus.log").open("w") as log:
        proc = spawn([PROMETHEUS or "prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                      f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                      "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, process_group=0)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(f"{server.url}/-/ready")
                break
            except OSError:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus did not get ready"
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _load(address: str, duration_s: float, concurrency: int) -> int:
    """Prompts sharing a prefix (prefix-cache hits, remote prefills: KV transfers) for `duration_s`
    (several scrapes: a counter's rate needs two samples that differ), every eighth stream cancelled
    by the client after its first token. Returns how many requests were sent."""
    sent = 0

    async def one(stub: inference_pb2_grpc.InferenceStub) -> None:
        nonlocal sent
        i, sent = sent, sent + 1
        ids = [*SHARED_PREFIX, *((i * 7 + j) % 500 + 4 for j in range(24))]
        sampling = pb.SamplingParameters(temperature=0.0, max_tokens=8, ignore_eos=True)
        call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling), timeout=60)
        async for _ in call:
            if i % 8 == 7:  # the client goes away: outcome "cancelled"
                call.cancel()
                break

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await one(stub)  # caches the shared prefix first
        deadline = time.monotonic() + duration_s

        async def client() -> None:
            while time.monotonic() < deadline:
                await one(stub)
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return sent


def _wait_for(prometheus: Prometheus, expr: str, want: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = prometheus.query(expr)["data"]["result"]
        if result and float(result[0]["value"][1]) >= want:
            return
        assert time.monotonic() < deadline, f"{expr}: {result}, want >= {want}"
        time.sleep(0.5)


def _substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr.replace('"$1"', ""), f"a variable is left in {expr}"
    return expr


def _check(prometheus: Prometheus, where: str, expr: str, may_be_empty: str | None, known: set[str],
           problems: list[str]) -> bool:
    """Appends what is wrong with `expr`; True if it returned data."""
    reply = prometheus.query(expr)
    if reply["status"] != "success":
        problems.append(f"{where}: {reply.get('errorType')}: {reply.get('error')}\n    {expr}")
        return False
    result = reply["data"]["result"]
    if result and any(math.isfinite(float(s["value"][1])) for s in result):
        return True
    unknown = sorted(n for n in metric_names(expr) if n not in known)
    if may_be_empty is None:
        problems.append(f"{where}: {'only NaN/Inf' if result else 'no data'}\n    {expr}")
    elif unknown:
        problems.append(f"{where}: may be empty ({may_be_empty}), but reads unknown metrics {unknown}\n    {expr}")
    return False


@pytest.mark.timeout(300)
async def test_every_panel_and_rule_returns_data(cluster: Cluster, prometheus: Prometheus) -> None:
    _wait_for(prometheus, 'count(up{job=~"tandem-.*"} == 1)', 2 + len(cluster.workers))
    sent = await _load(cluster.grpc_address, duration_s=8.0, concurrency=3)
    _wait_for(prometheus, f'sum(tandem_requests_total{{namespace="{NAMESPACE}"}})', sent)
    _wait_for(prometheus, f'count(tandem:time_to_first_token_seconds:p99_rate2m{{namespace="{NAMESPACE}"}} >= 0)', 1)

    # what Prometheus stores (series names) and what the components expose (families, with or without samples)
    stored = set(prometheus.get("/api/v1/label/__name__/values")["data"])
    exposed = {n for text in _texts(cluster).values() for n in exposed_families(text)}
    known = stored | exposed | {f"{n}_{s}" for n in exposed for s in ("bucket", "sum", "count")}

    def allowed_empty(expr: str) -> str | None:
        return next((why for k, why in EMPTY_ALLOWED.items() if any(n.startswith(k) for n in metric_names(expr))),
                    None)

    problems: list[str] = []
    queries = list(panel_queries(committed_dashboards()))
    rule_list = rules()
    assert len(queries) > 30 and rule_list
    expressions = [*(q.expr for q in queries), *(r.expr for r in rule_list)]
    stale = [k for k in EMPTY_ALLOWED if not any(k in e for e in expressions)]
    assert not stale, f"EMPTY_ALLOWED names metrics no query reads: {stale}"
    empty: list[str] = []
    for q in queries:
        if not _check(prometheus, q.where, _substitute(q.expr), allowed_empty(q.expr), known, problems):
            empty.append(q.where)
    for rule in rule_list:
        why = ALERTS_EMPTY_ALLOWED if rule.kind == "alert" else allowed_empty(rule.expr)
        if not _check(prometheus, f"{rule.kind} {rule.name}", rule.expr, why, known, problems):
            empty.append(f"{rule.kind} {rule.name}")
        if rule.kind == "record":  # and the series it records, evaluated by Prometheus itself
            _check(prometheus, f"recorded {rule.name}", rule.name, None, known, problems)

    loaded = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r.name for r in rule_list)
    problems += [f"rule {r['name']}: health {r['health']} {r.get('lastError', '')}" for r in loaded
                 if r["health"] != "ok"]

    namespaces = prometheus.get("/api/v1/label/namespace/values", **{"match[]": "tandem_router_inflight_requests"})
    assert namespaces["data"] == [NAMESPACE]  # what the dashboards' namespace variable lists
    assert not problems, "\n".join(problems)
    print(f"{len(queries)} panel queries, {len(rule_list)} rules; empty (allowed):", *empty, sep="\n  ")


def _texts(cluster: Cluster) -> dict[str, str]:
    """Each component's /metrics."""
    return {"router": router_metrics(cluster), "planner": fetch(f"http://{planner_url(cluster)}/metrics"),
            **{w.worker_id: worker_metrics(w) for w in cluster.workers},
            **{s.store_id: fetch(f"http://127.0.0.1:{s.metrics_port}/metrics") for s in cluster.kv_stores}}


def test_exposed_metrics_are_the_documented_ones(cluster: Cluster) -> None:
    """Every `tandem_*` family the router, the workers and the planner expose is in docs/metrics.md
    with its type and (where it has samples) its labels, and every documented one is exposed."""
    documented = documented_families()
    exposed: dict[str, str] = {}
    for component, text in _texts(cluster).items():
        for name, kind in exposed_families(text).items():
            assert name in documented, f"{component} exposes {name}: not in docs/metrics.md"
            assert documented[name].type == kind, f"{name}: exposed as {kind}, documented {documented[name].type}"
            exposed[name] = kind
        for name, labels in sample_labels(text).items():
            assert set(documented[name].labels) == labels, f"{component} {name}: labels {sorted(labels)}"
    assert not set(documented) - set(exposed), f"documented, exposed by none: {set(documented) - set(exposed)}"
