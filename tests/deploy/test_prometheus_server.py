"""A real Prometheus scrapes a live broker and loads the alerting rules: every dashboard and
rule expression parses and evaluates, every rule is healthy, and what Prometheus stored is
the traffic the broker served. Needs ``prometheus`` and ``promtool`` (Debian's package)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broker.runtime import Broker
from tests.conftest import LiveServer, eval_token, exchange_form
from tests.deploy.test_grafana import DASHBOARD, exprs
from tests.deploy.test_prometheus import RULES
from tests.poll import poll
from tests.servers import Part, free_port_pair, require, stop_process

pytestmark = pytest.mark.integration
MISSING = "prometheus/promtool are not installed (Debian: apt-get install prometheus)"


def binaries() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    require(Part.PROMETHEUS, None if prometheus and promtool else MISSING)
    assert prometheus is not None and promtool is not None
    return prometheus, promtool


def rules() -> list[dict[str, Any]]:
    """Every alerting rule the file holds (as written, independently of promtool)."""
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_accepts_the_rules() -> None:
    _, promtool = binaries()
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@pytest.fixture
def prometheus(live_broker: tuple[LiveServer, Broker], tmp_path: Path) -> Iterator[str]:
    """Prometheus on a free loopback port scraping the live broker every second, with the
    rules; stopped at the end."""
    binary, _ = binaries()
    server, _ = live_broker
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "broker",
                "static_configs": [{"targets": [server.url.removeprefix("http://")]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port_pair()
    argv = [
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            poll(lambda: _ready(url), "Prometheus ready")
            yield url
        finally:
            stop_process(proc)


def _ready(url: str) -> bool | None:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200 or None
    except httpx.HTTPError:
        return None


def query(url: str, expr: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(
        f"{url}/api/v1/query", params={"query": expr}, timeout=10
    ).json()
    return answer


def test_prometheus_scrapes_the_broker_and_every_expression_evaluates(
    prometheus: str, live_broker: tuple[LiveServer, Broker]
) -> None:
    server, broker = live_broker
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(2):
            assert http.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200
        assert http.post("/v1/token", data=exchange_form("garbage")).status_code == 400

    def issued() -> bool | None:
        result = query(prometheus, 'sum(broker_exchanges_total{outcome="issued"})')["data"]
        return (bool(result["result"]) and result["result"][0]["value"][1] == "2") or None

    poll(issued, "Prometheus holding the two issued exchanges")
    refused = query(prometheus, 'broker_refusals_total{reason="malformed"}')["data"]["result"]
    assert [r["metric"]["endpoint"] for r in refused] == ["/v1/token"]

    dashboard = exprs(json.loads(DASHBOARD.read_text())["panels"])
    alerts = [rule["expr"] for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]
    failed = {}
    for expr in dashboard + alerts:
        answer = query(prometheus, expr.replace("$__rate_interval", "1m"))
        if answer["status"] != "success":
            failed[expr] = answer.get("error")
    assert failed == {}

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        found = [rule for group in groups for rule in group["rules"]]
        return found if found and all(r["health"] != "unknown" for r in found) else None

    evaluated = poll(rules_evaluated, "every rule evaluated once")
    assert len(evaluated) == len(rules())
    assert {r["name"]: r["health"] for r in evaluated if r["health"] != "ok"} == {}
