"""The CLI end to end against a live broker over HTTP: the README walk-through, exit codes."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.api.app import create_app
from broker.cli.main import main
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer, free_port
from tests.poll import SERVE_POLL_S


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
    assert code == 3 and "unreachable" in err and "POST http://127.0.0.1:9/dev/token" in err


@pytest.mark.parametrize("url", ["localhost:8080", "127.0.0.1:8080", "ftp://broker.example"])
def test_a_url_without_an_http_scheme_is_a_usage_error(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", url)
    assert code == 2 and err.startswith(f"error: --url {url!r} is not a broker URL")
    monkeypatch.setenv("BROKER_URL", url)
    code, _, err = run(capsys, "grants", "list", "--bearer-file", "-")
    assert code == 2 and err.startswith(f"error: BROKER_URL {url!r} is not a broker URL")
    if "://" not in url:
        assert f"did you mean http://{url}?" in err


def test_a_token_where_a_file_is_expected_is_named_not_echoed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJyZXBvOmFjbWUvZXZhbHMifQ.c2lnbmF0dXJl"
    common = ("--model", "llama-7b", "--action", "evaluate", "--url", "http://127.0.0.1:9")
    code, _, err = run(capsys, "token", "exchange", "--token", token, *common)
    assert code == 2 and "--token takes the path of a file" in err and "this is a token" in err
    assert token not in err and "eyJ" not in err
    code, _, err = run(capsys, "token", "exchange", "--token", "hvs.not-a-file", *common)
    assert code == 2 and "--token: no such file" in err and "hvs." not in err
    code, _, err = run(capsys, "grants", "list", "--bearer-file", token, "--url", "http://x")
    assert code == 2 and "--bearer-file takes the path of a file" in err and token not in err


def test_json_errors_are_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "dev", "token", "--sub", "x", "--url", "http://127.0.0.1:9", "--json"
    )
    assert code == 3 and out == ""
    body = json.loads(err)
    assert body["error"] == "unreachable" and "127.0.0.1:9" in body["error_description"]
    code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", "localhost:1", "--json")
    assert code == 2 and json.loads(err)["error"] == "usage_error"
    with pytest.raises(SystemExit) as exited:  # argparse's own usage errors, too
        main(["token", "exchange", "--model", "m", "--json"])
    assert exited.value.code == 2
    body = json.loads(capsys.readouterr().err)
    assert body["error"] == "usage_error" and "--token" in body["error_description"]
    missing = tmp_path / "none.yaml"
    code, _, err = run(capsys, "policy", "check", str(missing), "--json")
    assert code == 2 and str(missing) in json.loads(err)["error_description"]


class _Answer(http.server.BaseHTTPRequestHandler):
    """Something that is not the broker: a proxy's HTML error page, or a web page."""

    def do_POST(self) -> None:
        status, body = (502, b"<html><body><h1>502 Bad Gateway</h1></body></html>\n")
        if self.path.startswith("/ok"):
            status, body = 200, b"<html>welcome</html>"
        elif self.path.startswith("/empty"):
            status, body = 500, b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def not_a_broker() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_errors_say_what_was_reached_and_what_came_back(
    not_a_broker: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", not_a_broker)
    assert code == 3
    assert err == (
        f"error: http_502: POST {not_a_broker}/dev/token answered 502 Bad Gateway: "
        "<html><body><h1>502 Bad Gateway</h1></body></html>\n"
    )
    code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", f"{not_a_broker}/empty")
    assert code == 3 and err == (
        f"error: http_500: POST {not_a_broker}/empty/dev/token answered 500 Internal Server "
        "Error: (empty body)\n"
    )
    code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", f"{not_a_broker}/ok")
    assert code == 3 and err.startswith("error: not_a_broker: POST ")
    assert "answered 200 OK without a JSON object: <html>welcome</html>" in err

    # A broker without dev mode has no /dev/token: FastAPI's own 404, not the broker's shape.
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "issuers:\n  - {name: ci, issuer: 'https://ci.example.com', audiences: [a],"
        " jwks_uri: 'https://ci.example.com/jwks'}\n"
        "actions:\n  evaluate: {tier: low, max_ttl: 1h}\nmodels:\n  m: {}\n"
    )
    port = free_port()
    broker = build_broker(Settings(policy=policy, data_dir=data_dir, port=port))
    with LiveServer(create_app(broker=broker), port) as server:
        code, _, err = run(capsys, "dev", "token", "--sub", "x", "--url", server.url)
    assert code == 1
    assert err == "error: not_found: POST /dev/token: Not Found\n"


def test_admin_commands_need_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    code, _, err = run(capsys, "grants", "list", "--url", "http://127.0.0.1:9")
    assert code == 2 and "BROKER_TOKEN" in err


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "policy", "check", str(EXAMPLE_POLICY), "--dev", "--json")
    assert code == 0 and json.loads(out)["digest"].startswith("sha256:")
    assert json.loads(out)["warnings"] == [] and err == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE_POLICY.read_text().replace("max_ttl: 1h", "max_ttl: soon", 1))
    code, _, err = run(capsys, "policy", "check", str(bad), "--dev")
    assert code == 2 and str(bad) in err and "max_ttl" in err


def test_policy_check_of_the_example_warns_about_its_dev_issuers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As examples/policy.yaml's header says: `broker policy check examples/policy.yaml`."""
    code, out, err = run(capsys, "policy", "check", str(EXAMPLE_POLICY))
    assert code == 0 and out.startswith(f"ok {EXAMPLE_POLICY} sha256:")
    assert err.splitlines() == [
        f"warning: issuers[{i}].dev: issuer {name!r} is a dev issuer: `broker serve` refuses "
        "this policy without --dev"
        for i, name in ((3, "dev"), (4, "dev-people"))
    ]
    code, out, _ = run(capsys, "policy", "check", str(EXAMPLE_POLICY), "--json")
    assert code == 0 and len(json.loads(out)["warnings"]) == 2


def test_policy_check_names_a_misspelt_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(EXAMPLE_POLICY.read_text().replace("max_ttl: 1h}", "max_tll: 1h}", 1))
    (tmp_path / "keys").symlink_to(EXAMPLE_POLICY.parent / "keys")
    code, _, err = run(capsys, "policy", "check", str(typo))
    assert code == 2
    assert err == (
        f"error: {typo}: actions.evaluate.max_tll: unknown field 'max_tll' (did you mean "
        "'max_ttl'?); docs/policy.md lists the fields allowed here\n"
    )


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


def test_approval_required_has_its_own_exit_code_and_names_the_request(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, broker = live_broker
    assert broker.dev_issuer is not None
    k8s = {"kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "t", "uid": "u"}}}
    job = tmp_path / "job.jwt"
    common = ("--model", "llama-7b", "--action", "fine-tune", "--url", server.url)
    lineage = ("--lineage", '{"datasets": ["s3://datasets/approved/x"]}')
    job.write_text(broker.dev_issuer.mint(sub="system:serviceaccount:training:t", claims=k8s))
    code, _, err = run(capsys, "token", "exchange", "--token", str(job), *common, *lineage)
    assert code == 4
    [approval] = broker.approvals.find(status="pending")
    approval_id = approval["id"]
    assert err.startswith("error: approval_required: ")
    assert f"approval request {approval_id}: once approved" in err
    assert f"--approval-id {approval_id}" in err

    job.write_text(broker.dev_issuer.mint(sub="system:serviceaccount:training:t", claims=k8s))
    code, _, err = run(
        capsys, "token", "exchange", "--token", str(job), *common, *lineage, "--json"
    )
    assert code == 4
    body = json.loads(err)
    assert body["error"] == "approval_required" and body["approval_id"] == approval_id
    assert body["status"] == 403


def test_policy_explain_exits_4_when_the_decision_needs_approval(
    broker: Broker, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert broker.dev_issuer is not None
    k8s = {"kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "t", "uid": "u"}}}
    job = tmp_path / "job.jwt"
    job.write_text(broker.dev_issuer.mint(sub="system:serviceaccount:training:t", claims=k8s))
    common = ("--model", "llama-7b", "--action", "fine-tune", "--dev", "--data-dir", str(data_dir))
    code, out, _ = run(capsys, "policy", "explain", "--token", str(job), *common, "--json")
    assert code == 4 and json.loads(out)["outcome"] == "approval_required"


AGENT_WITH_TTL = (
    "from broker.cli.main import build_parser; from broker.cli.agent import provider_of; "
    "args = build_parser().parse_args(['agent', '--model', 'm', '--action', 'a', '--ttl', '1h', "
    "'--token-env', 'T', '--url', 'http://127.0.0.1:9', '--exec', '--', 'true']); "
    "assert provider_of(args).requested_ttl == 3600"
)


@pytest.mark.parametrize(
    "code",
    [
        "import broker.cli.main",
        "import broker.client",
        "import broker.cli.agent",
        "import broker.client.github_action",
        AGENT_WITH_TTL,
    ],
)
def test_the_cli_and_the_client_load_nothing_of_the_server(code: str) -> None:
    """Every command imports broker.cli.main and broker.client, training code imports
    broker.client, and a sidecar runs broker.cli.agent (--ttl and --exec included): they
    stay lean."""
    probe = (
        f"import sys; {code}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'starlette', 'sqlalchemy', 'hvac', 'boto3', 'botocore', 'uvicorn', "
        "'pydantic', 'pydantic_settings', 'yaml', 'orjson'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_serve_needs_one_worker_or_more(workers: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--dev", "--workers", workers])
    assert exited.value.code == 2
    assert "--workers" in capsys.readouterr().err
