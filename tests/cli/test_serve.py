"""``broker serve`` over real HTTP with JSON logs and the access log: every line on stderr is
one JSON object, each request's access line carries the id its answer returned, no query string
reaches the log (uvicorn's own access log stays off), and /metrics counts the traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, exchange_form
from tests.poll import poll
from tests.scrape import parse
from tests.servers import free_port_pair, stop_process

SECRET = "Q-SECRET-IN-A-QUERY"


def up(url: str) -> bool | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200 or None
    except httpx.HTTPError:
        return None


def test_serve_writes_json_lines_with_request_ids_and_counts_the_traffic(
    tmp_path: Path,
) -> None:
    port = free_port_pair()
    url = f"http://127.0.0.1:{port}"
    stderr = tmp_path / "stderr"
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "BROKER_LOG_FORMAT": "json",
        "BROKER_ACCESS_LOG": "true",
    }
    argv = ["serve", "--dev", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli.main", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        try:
            poll(lambda: up(url), "broker serve answering /healthz")
            with httpx.Client(base_url=url, timeout=10) as http:
                mint = {"sub": EVAL_SUB, "claims": {"job_workflow_ref": EVAL_WORKFLOW}}
                token = http.post("/dev/token", json=mint).json()["token"]
                issued = http.post(
                    "/v1/token", data=exchange_form(token), headers={"X-Request-ID": "ok-1"}
                )
                refused = http.post(f"/v1/token?subject_token={SECRET}", data=exchange_form("x"))
                metrics = parse(http.get("/metrics").text)
        finally:
            stop_process(proc)
    assert issued.status_code == 200 and issued.headers["X-Request-ID"] == "ok-1"
    assert refused.status_code == 400
    labels = {"model": "llama-7b", "action": "evaluate", "backend": "jwt"}
    assert metrics.value("broker_exchanges_total", **labels, outcome="issued") == 1
    assert metrics.value("broker_exchanges_total", **labels, outcome="invalid_request") == 1

    text = stderr.read_text()
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    assert SECRET not in text and token not in text
    assert any(line["message"].startswith("DEV MODE") for line in lines)
    access = {
        line["request_id"]: (line["method"], line["path"], line["status"], line["client"])
        for line in lines
        if line["logger"] == "broker.access"
    }
    assert access["ok-1"] == ("POST", "/v1/token", 200, "127.0.0.1")
    assert access[refused.headers["X-Request-ID"]] == ("POST", "/v1/token", 400, "127.0.0.1")
    assert not [line for line in lines if line["logger"].startswith("uvicorn.access")]
