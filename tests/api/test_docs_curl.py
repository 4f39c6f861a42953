"""The curl lines of README.md and docs/ work as printed, against a live dev broker, with token
files written the way `broker dev token > file` writes them (a trailing newline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.runtime import Broker
from tests.approvals.support import drill_token
from tests.conftest import LiveServer, eval_token, exchange_form, person_token
from tests.servers import Part, unavailable

ROOT = Path(__file__).resolve().parents[2]


def curl_command(doc: str, start: str) -> str:
    """The shell command in ``doc`` that begins with ``start``, with its continuation lines
    (README's are inside a comment, so the leading ``#`` and spaces go)."""
    lines = [line.lstrip("#").strip() for line in (ROOT / doc).read_text().splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    command = []
    for line in lines[first:]:
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            return " ".join(command)
    raise AssertionError(f"{doc}: the command starting {start!r} never ends")


def run(command: str, cwd: Path, **env: str) -> dict[str, object]:
    if shutil.which("curl") is None:
        unavailable(Part.CURL, "curl is not installed (apt-get install curl)")
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture
def live(live_broker: tuple[LiveServer, Broker], tmp_path: Path) -> tuple[LiveServer, Broker]:
    server, broker = live_broker
    (tmp_path / "workload.jwt").write_text(eval_token(broker) + "\n")
    return server, broker


@pytest.mark.parametrize(
    ("doc", "start"),
    [("README.md", "curl -s localhost:8080/v1/token"), ("docs/api.md", "curl -s $B/v1/token")],
)
def test_the_documented_exchange_works_with_a_token_file(
    live: tuple[LiveServer, Broker], tmp_path: Path, doc: str, start: str
) -> None:
    server, _ = live
    command = curl_command(doc, start).replace("localhost:8080", server.url)
    body = run(command, tmp_path, B=server.url)
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt", body
    assert body["scope"] == "evaluate"


@pytest.mark.parametrize(
    ("doc", "variable"),
    [("docs/api.md", "BROKER_TOKEN"), ("docs/relying-parties.md", "CALLER_TOKEN")],
)
def test_the_documented_introspection_says_a_live_token_is_active(
    live: tuple[LiveServer, Broker], tmp_path: Path, doc: str, variable: str
) -> None:
    server, broker = live
    answer = run(curl_command("docs/api.md", "curl -s $B/v1/token"), tmp_path, B=server.url)
    (tmp_path / "broker.jwt").write_text(str(answer["access_token"]) + "\n")
    command = curl_command(doc, "curl -s $B/v1/introspect")
    body = run(command, tmp_path, B=server.url, **{variable: person_token(broker, "auditor")})
    assert body["active"] is True and body["grant_id"] == answer["grant_id"]


def test_surrounding_whitespace_is_ignored_everywhere(client: TestClient, broker: Broker) -> None:
    form = exchange_form(f"  {eval_token(broker)}\r\n")
    issued = client.post("/v1/token", data=form)
    assert issued.status_code == 200, issued.text
    auth = {"Authorization": f"Bearer {person_token(broker, 'auditor')} "}
    token = f"\n{issued.json()['access_token']}\n"
    assert client.post("/v1/introspect", data={"token": token}, headers=auth).json()["active"]


def test_the_documented_rollback_test_report_and_list_work(
    live: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live
    (tmp_path / "drill.jwt").write_text(drill_token(broker) + "\n")
    command = curl_command("docs/api.md", "curl -s $B/v1/rollback-tests")
    recorded = run(command, tmp_path, B=server.url)
    assert recorded["result"] == "passed" and recorded["id"].startswith("rt_"), recorded
    listed = run(
        curl_command("docs/api.md", 'curl -s "$B/v1/rollback-tests?model=llama-7b"'),
        tmp_path,
        B=server.url,
        BROKER_TOKEN=person_token(broker, "auditor"),
    )
    assert [t["id"] for t in listed["rollback_tests"]] == [recorded["id"]]
