"""Reading ``/metrics`` in tests with prometheus_client's own parser."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker.api.app import create_app
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.conftest import eval_token, exchange_form

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and labels, and every family by type."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels``, or None when there is none."""
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str) -> list[dict[str, str]]:
        """The label sets of every sample called ``name``."""
        return [dict(labels) for sample, labels in self.samples if sample == name]

    def names(self) -> set[str]:
        """Every sample name the broker exports, whether or not a series exists yet (a
        labelled counter before its first increment has a family and no samples)."""
        exported = {name for name, _ in self.samples}
        for family, kind in self.types.items():
            exported |= {family + suffix for suffix in SUFFIXES.get(kind, ("",))}
        return exported


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types)


def scrape_everything(data_dir: Path) -> Scrape:
    """A scrape of a broker with every part of the metrics on: checkpoint publication
    configured, a signed checkpoint and an exchange."""
    settings = Settings(
        dev=True,
        data_dir=data_dir,
        policy=EXAMPLE_POLICY,
        audit_publish_url="http://127.0.0.1:9/audit",
        checkpoint_interval=3600,
    )
    broker = build_broker(settings)
    try:
        with broker.store.write() as session:
            broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
        with TestClient(create_app(broker=broker)) as client:
            client.post("/v1/token", data=exchange_form(eval_token(broker)))
            return parse(client.get("/metrics").text)
    finally:
        broker.close()
