"""The approval commands against a live broker: what a reviewer sees (`approvals show`), and a
workload that waits (`approvals wait`, `token exchange --wait`) with its exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.cli import main as cli
from broker.runtime import Broker
from tests.approvals.test_flow import K8S, TRAINER
from tests.cli.test_main import run
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer
from tests.faults import grant_statuses

DIGEST = "ab" * 32
LINEAGE = {
    "datasets": [{"uri": "s3://datasets/approved/set-1", "sha256": DIGEST}],
    "weights": ["s3://models/llama-7b/base"],
    "rollback_point": {
        "uri": "s3://models/llama-7b/v41",
        "test": {"ref": "ci://rollback/9", "result": "passed", "tested_at": "2026-11-24T09:12:00Z"},
    },
}


def exchange_fine_tune(
    capsys: pytest.CaptureFixture[str], server: LiveServer, job: Path, *extra: str
) -> tuple[int, str, str]:
    """``broker token exchange`` of the trainer's fine-tune with LINEAGE, plus ``extra``."""
    return run(
        capsys,
        *("token", "exchange", "--token", str(job), "--model", "llama-7b"),
        *("--action", "fine-tune", "--lineage", json.dumps(LINEAGE), "--url", server.url),
        *extra,
    )


def job_token(broker: Broker, path: Path, **claims: object) -> Path:
    """A fresh single-use token of the trainer (the example's dev-trainer rule) in ``path``."""
    assert broker.dev_issuer is not None
    path.write_text(broker.dev_issuer.mint(sub=TRAINER, claims={**K8S, **claims}) + "\n")
    return path


def person(broker: Broker, sub: str, *roles: str) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=sub, roles=list(roles or ("approver",)))


def api(server: LiveServer, method: str, path: str, token: str, **body: Any) -> Any:
    resp = httpx.request(
        method, server.url + path, json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code < 300, resp.text
    return resp.json()


def open_request(server: LiveServer, broker: Broker, tmp_path: Path, **body: Any) -> str:
    token = job_token(broker, tmp_path / "open.jwt").read_text().strip()
    fields = {"model": "llama-7b", "action": "fine-tune", "lineage": LINEAGE, **body}
    return str(api(server, "POST", "/v1/approvals", token, **fields)["id"])


def decide(server: LiveServer, broker: Broker, approval_id: str, verb: str, sub: str) -> Any:
    token = person(broker, sub)
    return api(server, "POST", f"/v1/approvals/{approval_id}/{verb}", token, reason=f"{verb} ok")


def test_show_prints_what_the_reviewer_approves(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    first = open_request(server, broker, tmp_path, reason="November refresh")
    decide(server, broker, first, "approve", "bob@example.com")
    approval_id = open_request(
        server,
        broker,
        tmp_path,
        reason="December refresh\x1b[2J\napprovals  1 of 1",
        requested_ttl=600,
    )
    monkeypatch.setenv("BROKER_TOKEN", person(broker, "carol@example.com"))
    code, out, _ = run(capsys, "approvals", "show", approval_id, "--url", server.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        f"{approval_id}  pending  fine-tune on llama-7b via jwt  (tier elevated, rule dev-trainer)"
    )
    for expected in (
        f"requester  {TRAINER} (dev)",
        "  claim kubernetes.io/namespace = training",
        f"  claim sub = {TRAINER}",
        "credential urn:ietf:params:oauth:token-type:jwt, audience model:llama-7b, ttl 600 s",
        f"  dataset  s3://datasets/approved/set-1  sha256:{DIGEST}",
        "  weight   s3://models/llama-7b/base  (no digest)",
        "  rollback s3://models/llama-7b/v41  (no digest)",
        "    evidence ci://rollback/9: passed at 2026-11-24T09:12:00Z",
        "approvals  0 of 1",
        '  reason: "November refresh" -> "December refresh\\u001b[2J\\napprovals  1 of 1"',
        "  ttl_seconds: 14400 -> 600",
    ):
        assert expected in lines, (expected, out)
    # What the requester wrote cannot forge a line or move the cursor.
    assert "\x1b" not in out
    assert "reason     December refresh\\x1b[2J\\napprovals  1 of 1" in lines
    assert any(line.startswith(f"since {first} (approved ") for line in lines)


def test_wait_exits_with_the_outcome(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    url = ("--url", server.url)
    job = job_token(broker, tmp_path / "job.jwt")
    pending = open_request(server, broker, tmp_path)
    code, _, err = run(
        capsys, "approvals", "wait", pending, "--token", str(job), *url, "--timeout", "0"
    )
    assert code == cli.EXIT_TIMEOUT == 5
    assert err == (
        f"error: timeout: approval {pending} is still pending after 0 s (0 of 1 approval(s)); "
        "wait again, or give a longer --timeout\n"
    )

    decide(server, broker, pending, "deny", "dave@example.com")
    code, _, err = run(capsys, "approvals", "wait", pending, "--token", str(job), *url, "--json")
    assert code == 1
    assert json.loads(err) == {
        "error": "approval_denied",
        "error_description": f"approval {pending} is denied: denied by dave@example.com "
        "(dev-people): deny ok",
        "approval_id": pending,
        "approval_status": "denied",
    }

    other = open_request(server, broker, tmp_path, reason="another")
    decide(server, broker, other, "approve", "bob@example.com")
    monkeypatch.setenv("BROKER_TOKEN", person(broker, "audra@example.com", "auditor"))
    code, out, _ = run(capsys, "approvals", "wait", other, *url, "--json")
    assert code == 0 and json.loads(out)["status"] == "approved"


def test_wait_polls_with_exponential_backoff_until_decided(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    approval_id = open_request(server, broker, tmp_path)
    pauses: list[float] = []

    def sleep(seconds: float) -> None:  # the reviewer decides during the third pause
        pauses.append(seconds)
        if len(pauses) == 3:
            decide(server, broker, approval_id, "approve", "bob@example.com")

    monkeypatch.setattr(cli, "_sleep", sleep)
    job = job_token(broker, tmp_path / "job.jwt")
    code, out, _ = run(
        capsys, "approvals", "wait", approval_id, "--token", str(job), "--url", server.url
    )
    assert code == 0 and f"{approval_id}  approved" in out
    assert pauses == [1.0, 2.0, 4.0]


def test_exchange_wait_opens_waits_and_exchanges_with_the_same_single_use_token(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    approvals: list[str] = []

    def sleep(_seconds: float) -> None:
        listed = api(server, "GET", "/v1/approvals", person(broker, "bob@example.com"))
        approvals.extend(a["id"] for a in listed["approvals"])
        decide(server, broker, approvals[0], "approve", "bob@example.com")

    monkeypatch.setattr(cli, "_sleep", sleep)
    job = job_token(broker, tmp_path / "job.jwt")  # the dev issuer's tokens are single-use
    code, out, err = exchange_fine_tune(capsys, server, job, "--ttl", "10m", "--wait", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["expires_in"] == 600 and answer["scope"] == "fine-tune"
    view = broker.approvals.get(approvals[0])
    assert (view["status"], view["grant_id"]) == ("used", answer["grant_id"])
    assert len(broker.approvals.find()) == 1

    # A low action needs no approval: --wait exchanges at once.
    assert broker.dev_issuer is not None
    evals = tmp_path / "eval.jwt"
    evals.write_text(
        broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
    )
    code, out, _ = run(
        capsys,
        "token",
        "exchange",
        "--token",
        str(evals),
        "--model",
        "llama-7b",
        "--action",
        "evaluate",
        "--url",
        server.url,
        "--wait",
        "--json",
    )
    assert code == 0 and json.loads(out)["scope"] == "evaluate"


def test_exchange_wait_that_is_denied_exchanges_nothing(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    approval_id = open_request(server, broker, tmp_path)
    decide(server, broker, approval_id, "deny", "dave@example.com")
    job = job_token(broker, tmp_path / "job.jwt")
    code, _, err = exchange_fine_tune(capsys, server, job, "--approval-id", approval_id, "--wait")
    assert code == 1
    assert err.startswith(f"error: approval_denied: approval {approval_id} is denied: denied by")
    assert grant_statuses(broker) == {}


def test_exchange_wait_with_an_approval_for_another_request_names_the_difference(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, broker = live_broker
    approval_id = open_request(server, broker, tmp_path)
    decide(server, broker, approval_id, "approve", "bob@example.com")
    job = job_token(broker, tmp_path / "job.jwt")
    code, _, err = exchange_fine_tune(
        capsys, server, job, "--ttl", "5m", "--approval-id", approval_id, "--wait"
    )
    assert code == cli.EXIT_APPROVAL
    assert "ttl_seconds: approved 14400, requested 300" in err
    assert "no request was opened" in err and len(broker.approvals.find()) == 1
