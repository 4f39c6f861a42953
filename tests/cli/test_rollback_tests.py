"""``broker rollback-tests report|list`` against a live dev broker: a rollback tester reports a
test with its own token, people list it, and the approval it allows goes through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.runtime import Broker
from tests.approvals.support import POINT, drill_token
from tests.cli.test_main import run
from tests.conftest import LiveServer


def test_report_then_list(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    assert broker.dev_issuer is not None
    url = ("--url", server.url)
    drill = tmp_path / "drill.jwt"
    drill.write_text(drill_token(broker) + "\n")
    point = ("--uri", POINT["uri"], "--sha256", POINT["sha256"])
    report = ("rollback-tests", "report", "--token", str(drill), "--model", "llama-7b", *point)
    code, out, err = run(
        capsys, *report, "--result", "passed", "--evidence-uri", "https://ci/runs/1", *url
    )
    assert code == 0, err
    assert "passed  llama-7b" in out and POINT["sha256"] in out and "https://ci/runs/1" in out
    [recorded] = broker.rollback_tests.find()

    # The token was single use: the same file again is refused (401: exit 1).
    code, _, err = run(capsys, *report, "--result", "passed", "--json", *url)
    assert code == 1 and json.loads(err)["error"] == "invalid_token"

    monkeypatch.setenv("BROKER_TOKEN", broker.dev_issuer.mint(sub="bob", roles=["auditor"]))
    code, out, _ = run(capsys, "rollback-tests", "list", "--model", "llama-7b", *url)
    assert code == 0 and recorded["id"] in out and "RECORDED_AT" in out
    code, out, _ = run(capsys, "rollback-tests", "list", "--json", *url)
    assert code == 0 and [t["id"] for t in json.loads(out)] == [recorded["id"]]


def test_a_workload_without_the_rule_is_refused(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, broker = live_broker
    assert broker.dev_issuer is not None
    token = tmp_path / "release.jwt"
    token.write_text(broker.dev_issuer.mint(sub="repo:acme/release:ref:refs/heads/main"))
    code, _, err = run(
        capsys,
        "rollback-tests",
        "report",
        "--token",
        str(token),
        "--model",
        "llama-7b",
        "--uri",
        POINT["uri"],
        "--sha256",
        POINT["sha256"],
        "--result",
        "passed",
        "--url",
        server.url,
    )
    assert code == 1 and err.startswith("error: access_denied: ")
    assert broker.rollback_tests.find() == []


def test_the_parser_with_every_command_loads_nothing_of_the_server() -> None:
    probe = (
        "import sys, broker.cli.main; broker.cli.main.build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'starlette', 'sqlalchemy', 'hvac', 'boto3', 'botocore', 'uvicorn'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
