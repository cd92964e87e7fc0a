"""Helpers of the observability tests: the committed dashboards and their queries, the Prometheus
rules, the metric table of docs/metrics.md, and the `tandem_*` metric families the code defines
(from the prometheus_client objects of every module that defines one)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
RULE_FILES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
METRICS_DOC = REPO / "docs" / "metrics.md"
PACKAGES = ("common", "engine", "kv_transfer", "worker_runtime", "prefill_worker", "decode_worker", "kv_store",
            "cluster")
METRIC_NAME = re.compile(r"\btandem[_:][a-zA-Z0-9_:]*")
PLANNER_PREFIX = "tandem_planner_"


@functools.cache
def generator() -> ModuleType:
    """deploy/grafana/dashboards.py (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location("tandem_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA.glob("*.json"))}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def panel_queries(dashboards: dict[str, dict[str, Any]]) -> Iterator[PanelQuery]:
    for name, model in dashboards.items():
        for panel in model["panels"]:
            for target in panel.get("targets", []):
                yield PanelQuery(name, panel["title"], target["refId"], target["expr"])


@dataclass(frozen=True)
class Rule:
    name: str  # the recorded series or the alert
    kind: str  # "record" or "alert"
    expr: str


def rules() -> list[Rule]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                kind = "record" if "record" in rule else "alert"
                found.append(Rule(rule[kind], kind, rule["expr"]))
    return found


def metric_names(expr: str) -> set[str]:
    """The `tandem_*` metrics and `tandem:*` recorded series an expression reads."""
    return set(METRIC_NAME.findall(expr))


@dataclass(frozen=True)
class Family:
    """A metric family as Prometheus stores it: counters with `_total`, histograms without suffix."""
    name: str
    type: str
    labels: tuple[str, ...]
    help: str = ""


def documented_families(path: Path = METRICS_DOC) -> dict[str, Family]:
    """The rows `| `name` | type | `label`, ... | meaning |` of docs/metrics.md."""
    found: dict[str, Family] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\|\s*`(tandem_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if match:
            name, kind, labels = match.groups()
            assert name not in found, f"{name} is documented twice"
            found[name] = Family(name, kind, tuple(sorted(re.findall(r"`(\w+)`", labels))))
    return found


_DEFINITION = re.compile(r"(?:Counter|Gauge|Histogram|Summary|Info|Enum|MetricFamily)\(\s*\n?\s*[\"']tandem_")


def metric_modules() -> list[str]:
    """Every module whose source defines a `tandem_*` metric (a new one is picked up by itself)."""
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if _DEFINITION.search(path.read_text()):
                modules.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return modules


_SUFFIX = {"counter": "_total"}


def _planner_metrics() -> object:
    from cluster.planner.metrics import PlannerMetrics
    from cluster.planner.settings import PlannerSettings
    return PlannerMetrics(PlannerSettings())


# Modules whose metrics live in an object rather than at module level: how to build one.
INSTANCES = {"cluster.planner.metrics": _planner_metrics}


def _wrapped(values: Iterator[object]) -> Iterator[Family]:
    for value in values:
        if isinstance(value, MetricWrapperBase):
            name = value._name + _SUFFIX.get(value._type, "")  # what the exposition calls it
            yield Family(name, value._type, tuple(sorted(value._labelnames)), value._documentation)


def _collected(module: ModuleType) -> Iterator[Family]:
    """The families of the module's collectors, each built with stand-in arguments."""
    for value in vars(module).values():
        if (inspect.isclass(value) and value.__module__ == module.__name__ and Collector in value.__mro__
                and not inspect.isabstract(value)):
            collector = value(*(mock.MagicMock() for _ in inspect.signature(value).parameters))
            if hasattr(collector, "add"):  # a collector of many sources (worker_runtime.metrics.EngineCollector)
                collector.add(mock.MagicMock(), "stand-in")
            for family in collector.collect():
                labels = {k for s in family.samples for k in s.labels} - {"le"}
                yield Family(family.name + _SUFFIX.get(family.type, ""), family.type, tuple(sorted(labels)),
                             family.documentation)


def defined_families() -> dict[str, Family]:
    """What the code exports: the prometheus_client metrics of every metric module (at module level,
    or in the object INSTANCES builds) and the families its collectors yield. Every `tandem_*` name
    a metric module's source spells must be among them."""
    found: dict[str, Family] = {}
    for module_name in metric_modules():
        module = importlib.import_module(module_name)
        families = [*_wrapped(iter(vars(module).values())), *_collected(module)]
        if module_name in INSTANCES:
            families += _wrapped(iter(vars(INSTANCES[module_name]()).values()))
        found.update((f.name, f) for f in families if f.name.startswith("tandem_"))
        spelled = set(re.findall(r"[\"'](tandem_[a-z0-9_]+)[\"']", Path(module.__file__ or "").read_text()))
        bases = {n.removesuffix("_total") for n in found} | set(found)
        assert spelled <= bases, f"{module_name} defines {spelled - bases}: build its metrics in INSTANCES"
    return found


def exposed_families(text: str) -> dict[str, str]:
    """`tandem_*` families in Prometheus text (name → type), the `_created` gauges left out."""
    return {name: kind for name, kind in re.findall(r"^# TYPE (tandem_\w+) (\w+)$", text, re.MULTILINE)
            if not name.endswith("_created")}


def sample_labels(text: str) -> dict[str, set[str]]:
    """Label names of the samples of each family in Prometheus text (`le` left out)."""
    families = exposed_families(text)
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^(tandem_\w+?)(_bucket|_sum|_count)?(?:\{(.*)\})? \S+$", line)
        if not match:
            continue
        name = match.group(1) if match.group(1) in families else match.group(1) + (match.group(2) or "")
        if name in families:
            found.setdefault(name, set()).update(set(re.findall(r'(\w+)="', match.group(3) or "")) - {"le"})
    return found
