"""The Grafana dashboard asks only for metrics the broker exports: every name in every ``expr``
is compared with a real scrape of a broker with every part of the metrics enabled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promql import PROMQL_WORDS, names_in
from tests.scrape import scrape_everything

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "broker.json"


def exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in exprs(value)]
    if isinstance(node, list):
        return [e for value in node for e in exprs(value)]
    return []


def test_names_in_reads_a_promql_expression() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, backend) (rate(broker_x_bucket{a="b}"}[5m])))'
        " / on (issuer) broker_y"
    )
    assert names_in(expr) == {"histogram_quantile", "sum", "rate", "broker_x_bucket", "broker_y"}


@pytest.fixture
def exported(data_dir: Path) -> set[str]:
    """Every sample name of a broker with every part of the metrics on."""
    return scrape_everything(data_dir).names()


def test_every_expression_asks_for_exported_metrics_only(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    found = exprs(dashboard["panels"])
    assert len(found) >= 20
    unknown: dict[str, set[str]] = {}
    for expr in found:
        names = names_in(expr) - PROMQL_WORDS
        assert any(name.startswith("broker_") for name in names), expr
        if missing := names - exported:
            unknown[expr] = missing
    assert unknown == {}


def test_every_panel_queries_the_chosen_prometheus(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    [variable] = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {"${datasource}"}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # The families the doc says an operator alerts on are all on the dashboard.
    shown = {name for expr in exprs(panels) for name in names_in(expr)}
    families = {
        name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count") for name in shown
    }
    alerting = {n.removesuffix("_total") for n in exported if n.startswith("broker_")}
    alerting = {n for n in alerting if not n.endswith(("_created", "_sum", "_bucket", "_count"))}
    assert alerting - families == set()
