"""``broker serve`` over real HTTP with JSON logs and the access log: every line on stderr is
one JSON object, each request's access line carries the id its answer returned, no query string
reaches the log (uvicorn's own access log stays off), X-Forwarded-For from an untrusted peer
(loopback included) names no client, and /metrics counts the traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.cli.serve import plan_affinity
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
                # uvicorn by default believes X-Forwarded-For from loopback: the broker must
                # not (no BROKER_TRUSTED_PROXIES here), or any local caller picks its address.
                spoofed = {"X-Request-ID": "ok-1", "X-Forwarded-For": "203.0.113.9"}
                issued = http.post("/v1/token", data=exchange_form(token), headers=spoofed)
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
    # A serving process freezes its start-up heap (broker.api.heap; tests' apps never do).
    assert [line for line in lines if line["logger"] == "broker.api.heap"]


def test_workers_are_pinned_only_when_each_can_have_a_cpu_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` plans one slot per worker on the CPUs this process may use; ``off``, a single
    worker, or more workers than CPUs plan none (tests/integration/test_workers.py runs it)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 2, 5})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert plan_affinity("off", 2) is None
    assert plan_affinity("auto", 1) is None
    assert plan_affinity("auto", 4) is None
    slots = plan_affinity("auto", 2)
    assert slots is not None and slots.parent == tmp_path
    assert sorted(p.name for p in slots.iterdir()) == ["cpu-0", "cpu-2"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in slots.iterdir())
