"""The CLI end to end against a live broker over HTTP: the README walk-through, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli.main import main
from broker.runtime import Broker
from broker.settings import EXAMPLE_POLICY
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_walk_through(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = live_broker
    url = ("--url", server.url)
    code, out, _ = run(
        capsys,
        "dev",
        "token",
        "--sub",
        EVAL_SUB,
        "--claim",
        f"job_workflow_ref={EVAL_WORKFLOW}",
        *url,
    )
    assert code == 0
    workload = tmp_path / "workload.jwt"
    workload.write_text(out)

    code, out, _ = run(
        capsys,
        "token",
        "exchange",
        "--token",
        str(workload),
        "--model",
        "llama-7b",
        "--action",
        "evaluate",
        "--json",
        *url,
    )
    assert code == 0
    issued = json.loads(out)
    broker_jwt = tmp_path / "broker.jwt"
    broker_jwt.write_text(issued["access_token"])

    code, out, _ = run(
        capsys,
        "token",
        "exchange",
        "--token",
        str(workload),
        "--model",
        "llama-7b",
        "--action",
        "evaluate",
        *url,
    )
    assert code == 1  # replayed single-use token

    code, out, _ = run(capsys, "dev", "token", "--sub", "alice", "--roles", "admin", *url)
    monkeypatch.setenv("BROKER_TOKEN", out.strip())

    code, out, _ = run(capsys, "grants", "list", *url)
    assert code == 0 and issued["grant_id"] in out and "STATUS" in out
    code, out, _ = run(capsys, "grants", "show", issued["grant_id"], "--json", *url)
    assert json.loads(out)["status"] == "active"
    code, out, _ = run(capsys, "token", "introspect", "--token", str(broker_jwt), *url)
    assert code == 0 and "True" in out

    code, out, _ = run(capsys, "grants", "revoke", issued["grant_id"], "--reason", "demo", *url)
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "token", "introspect", "--token", str(broker_jwt), "--json", *url)
    assert code == 1 and json.loads(out) == {"active": False}
    code, _, err = run(capsys, "grants", "revoke", issued["grant_id"], "--reason", "again", *url)
    assert code == 1 and "conflict" in err


def test_unreachable_broker_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", "http://127.0.0.1:9")
    assert code == 3 and "unreachable" in err


def test_admin_commands_need_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    code, _, err = run(capsys, "grants", "list", "--url", "http://127.0.0.1:9")
    assert code == 2 and "BROKER_TOKEN" in err


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "check", str(EXAMPLE_POLICY), "--dev", "--json")
    assert code == 0 and json.loads(out)["digest"].startswith("sha256:")
    code, _, err = run(capsys, "policy", "check", str(EXAMPLE_POLICY))
    assert code == 2 and "--dev" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE_POLICY.read_text().replace("max_ttl: 1h", "max_ttl: soon", 1))
    code, _, err = run(capsys, "policy", "check", str(bad), "--dev")
    assert code == 2 and str(bad) in err and "max_ttl" in err


def test_policy_explain(
    broker: Broker, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert broker.dev_issuer is not None
    good = tmp_path / "good.jwt"
    good.write_text(
        broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
    )
    common = ("--model", "llama-7b", "--action", "evaluate", "--dev", "--data-dir", str(data_dir))
    code, out, _ = run(capsys, "policy", "explain", "--token", str(good), *common)
    assert code == 0 and "dev-nightly-eval" in out
    bad = tmp_path / "bad.jwt"
    bad.write_text(
        broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": "evil@refs/heads/main"})
    )
    code, out, _ = run(capsys, "policy", "explain", "--token", str(bad), "--json", *common)
    assert code == 1
    explained = json.loads(out)
    assert explained["outcome"] == "deny"
    assert any(
        "job_workflow_ref" in r and "evil@refs/heads/main" in r for r in explained["reasons"]
    )


def test_approvals_walk_through(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    assert broker.dev_issuer is not None
    url = ("--url", server.url)
    k8s = {"kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "t", "uid": "u"}}}
    sub = "system:serviceaccount:training:t"
    job = tmp_path / "job.jwt"
    job.write_text(broker.dev_issuer.mint(sub=sub, claims=k8s))
    lineage = '{"datasets": ["s3://datasets/approved/x"]}'
    common = ("--model", "llama-7b", "--action", "fine-tune", "--lineage", lineage)
    code, out, _ = run(capsys, "approvals", "request", "--token", str(job), *common, "--json", *url)
    assert code == 0
    approval_id = json.loads(out)["id"]

    monkeypatch.setenv("BROKER_TOKEN", broker.dev_issuer.mint(sub="bob", roles=["approver"]))
    code, out, _ = run(capsys, "approvals", "list", "--status", "pending", *url)
    assert code == 0 and approval_id in out
    code, out, _ = run(capsys, "approvals", "approve", approval_id, "--reason", "looks right", *url)
    assert code == 0 and "approved" in out and "looks right" in out

    job.write_text(broker.dev_issuer.mint(sub=sub, claims=k8s))
    code, out, _ = run(
        capsys,
        "token",
        "exchange",
        "--token",
        str(job),
        "--model",
        "llama-7b",
        "--action",
        "fine-tune",
        "--lineage",
        lineage,
        "--approval-id",
        approval_id,
        "--json",
        *url,
    )
    assert code == 0, out
    grant_id = json.loads(out)["grant_id"]
    code, out, _ = run(capsys, "lineage", "llama-7b", *url)
    assert (
        code == 0
        and grant_id in out
        and "approve by bob" in out
        and "s3://datasets/approved/x" in out
    )
    code, _, err = run(capsys, "approvals", "deny", approval_id, "--reason", "late", *url)
    assert code == 1 and "already used" in err
