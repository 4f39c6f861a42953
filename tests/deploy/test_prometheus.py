"""The Prometheus alerting rules alert on metrics the broker exports, each with a severity and
a summary: every name in every ``expr`` is compared with a real scrape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.promql import PROMQL_WORDS, names_in
from tests.scrape import scrape_everything

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "broker-alerts.yml"


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    [group] = document["groups"]
    assert group["name"] == "model-credential-broker"
    found: list[dict[str, Any]] = group["rules"]
    return found


def test_every_alert_names_exported_metrics_only(data_dir: Path) -> None:
    exported = scrape_everything(data_dir).names()
    unknown = {rule["alert"]: names_in(rule["expr"]) - PROMQL_WORDS - exported for rule in rules()}
    assert {alert: names for alert, names in unknown.items() if names} == {}
    for rule in rules():
        assert any(n.startswith("broker_") for n in names_in(rule["expr"])), rule["alert"]


def test_every_alert_has_a_severity_and_a_summary() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)) >= 10
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
