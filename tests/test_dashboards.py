"""deploy/grafana/: the committed dashboards are what deploy/grafana/dashboards.py generates (so
they cannot drift from the code), every query goes to the `datasource` variable, every metric they
read exists, every metric of docs/metrics.md is on a dashboard, and the SLO lines are the
objectives of the Prometheus rules. tests/test_observability.py runs the queries on live data."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support.observability import (
    committed_dashboards,
    documented_families,
    generator,
    metric_names,
    panel_queries,
    rules,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return committed_dashboards()


def test_committed_json_is_what_the_generator_writes(dashboards: dict[str, dict[str, Any]]) -> None:
    module = generator()
    generated = module.dashboards()
    assert sorted(generated) == sorted(dashboards), "run python deploy/grafana/dashboards.py"
    for name, model in generated.items():
        assert (module.HERE / name).read_text() == module.render(model), (
            f"{name} is stale: run python deploy/grafana/dashboards.py")


def test_panels_use_the_datasource_variable(dashboards: dict[str, dict[str, Any]]) -> None:
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, model in dashboards.items():
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["namespace"]["datasource"] == DATASOURCE
        ids = [p["id"] for p in model["panels"]]
        assert len(set(ids)) == len(ids) and 0 not in ids, f"{name}: panel ids {ids}"
        for panel in (p for p in model["panels"] if p["type"] != "row"):
            assert panel["datasource"] == DATASOURCE, f"{name} / {panel['title']}"
            refs = [t["refId"] for t in panel["targets"]]
            assert panel["targets"] and len(set(refs)) == len(refs) and all(refs), f"{name} / {panel['title']}"
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE and target["expr"], f"{name} / {panel['title']}"
                assert 'namespace=~"$namespace"' in target["expr"], f"{name} / {panel['title']}: no namespace filter"


def test_queries_read_existing_metrics_and_cover_every_one(dashboards: dict[str, dict[str, Any]]) -> None:
    """Each metric a query reads is documented or recorded; each documented metric is on a
    dashboard (directly or through a recording rule); latency quantiles that a recording rule
    provides come from the rule."""
    documented = documented_families()
    readable = set(documented) | {f"{n}_{s}" for n, f in documented.items() if f.type == "histogram"
                                  for s in ("bucket", "sum", "count")}
    recorded = {r.name: metric_names(r.expr) for r in rules() if r.kind == "record"}
    read: set[str] = set()
    for q in panel_queries(dashboards):
        names = metric_names(q.expr)
        assert names <= readable | set(recorded), f"{q.where}: unknown {names - readable - set(recorded)}"
        read |= names.union(*(recorded.get(n, set()) for n in names))  # a recorded series reads its rule's metrics
        if "histogram_quantile" in q.expr:
            assert not re.search(r"tandem_(time_to_first_token|inter_token_latency)_seconds_bucket", q.expr), (
                f"{q.where}: use the recording rules tandem:*:p*_rate2m")
    unused = {n for n in documented if not {n, f"{n}_bucket"} & read}
    assert not unused, f"on no dashboard: {sorted(unused)}"


def _thresholds(dashboards: dict[str, dict[str, Any]], title: str) -> list[float]:
    [panel] = [p for d in dashboards.values() for p in d["panels"] if p["title"] == title]
    return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]


def test_slo_lines_are_the_rules_objectives(dashboards: dict[str, dict[str, Any]]) -> None:
    module = generator()
    by_name = {r.name: r.expr for r in rules()}
    ttft_le = re.search(r'time_to_first_token_seconds_bucket\{le=~?"([^"]+)"', by_name[
        "tandem:ttft_slo_errors:ratio_rate5m"]).group(1)  # type: ignore[union-attr]
    itl_le = re.search(r'inter_token_latency_seconds_bucket\{le=~?"([^"]+)"', by_name[
        "tandem:itl_slo_errors:ratio_rate5m"]).group(1)  # type: ignore[union-attr]
    # prometheus_client writes bucket bounds as repr(float): 1.0, 0.1
    assert re.fullmatch(ttft_le.replace("\\\\", "\\"), repr(module.TTFT_SLO_S)), ttft_le
    assert re.fullmatch(itl_le.replace("\\\\", "\\"), repr(module.ITL_SLO_S)), itl_le
    assert f"(14.4 * {module.SLO_ERROR_BUDGET})" in by_name["TandemTTFTBudgetBurnFast"]
    assert module.FAST_BURN_RATE == 14.4
    assert f"> {module.KV_NEARLY_FULL_RATIO}" in by_name["TandemKVCacheNearlyFull"]
    assert f"> {module.KV_TRANSFER_FAILED_RATIO}" in by_name["TandemKVTransferFailures"]
    assert _thresholds(dashboards, "Time to first token") == [module.TTFT_SLO_S]
    assert _thresholds(dashboards, "Inter-token latency") == [module.ITL_SLO_S]
    assert _thresholds(dashboards, "Share missing the SLOs") == [module.SLO_ERROR_BUDGET]
    assert _thresholds(dashboards, "KV cache usage") == [module.KV_NEARLY_FULL_RATIO]
