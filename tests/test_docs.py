"""docs/: configuration.md is what `python -m cluster.docs` generates from the CLI's parsers (every
subcommand, flag and TANDEM_* variable) and lists every variable read outside the flags;
metrics.md lists exactly the metrics the code defines, with their types and labels;
tuning-and-troubleshooting.md explains every alert of deploy/prometheus/rules; relative links
between the docs resolve."""

from __future__ import annotations

import re

import pytest

from cluster import docs
from tests.support.observability import REPO, defined_families, documented_families, rules

DOCS = REPO / "docs"
PACKAGES = ("common", "engine", "kv_transfer", "worker_runtime", "prefill_worker", "decode_worker", "cluster")


def test_configuration_is_generated_from_the_parsers() -> None:
    assert docs.OUTPUT.read_text() == docs.render(), "docs/configuration.md is stale: run python -m cluster.docs"


def test_configuration_lists_every_flag_of_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable set in the environment changes no documented default."""
    monkeypatch.setenv("TANDEM_GRACE_S", "99")
    text = docs.render()
    assert "`99`" not in text
    for command in ("up", "worker", "router"):
        assert f"## `tandem {command}`" in text
    assert "| `--etcd` | `TANDEM_ETCD` | string | required |" in text  # worker, router


def test_every_variable_read_directly_is_documented() -> None:
    pattern = re.compile(r"environ(?:\.get\(|\.setdefault\(|\[)\s*\"(TANDEM_[A-Z0-9_]+)\"")
    read = {m for package in PACKAGES for path in (REPO / package).rglob("*.py")
            for m in pattern.findall(path.read_text())}
    assert read == set(docs.DIRECT_VARIABLES)


def test_metrics_doc_lists_exactly_the_defined_metrics() -> None:
    documented, defined = documented_families(), defined_families()
    assert set(documented) == set(defined), (
        f"undocumented: {sorted(set(defined) - set(documented))}, gone: {sorted(set(documented) - set(defined))}")
    for name, family in defined.items():
        assert (documented[name].type, documented[name].labels) == (family.type, family.labels), name
        assert family.help, f"{name} has no help text"


def test_every_alert_is_explained() -> None:
    alerts = {r.name for r in rules() if r.kind == "alert"}
    text = (DOCS / "tuning-and-troubleshooting.md").read_text()
    explained = set(re.findall(r"^### `(Tandem\w+)`", text, re.MULTILINE))
    assert explained == alerts, (sorted(alerts - explained), sorted(explained - alerts))


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_resolve(page: str) -> None:
    path = DOCS / page
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):
            assert (path.parent / target).exists(), f"{page}: {target}"
