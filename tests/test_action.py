"""The composite GitHub Action (action.yml) run as the runner runs it, against a live broker.

A stand-in for the runner's OIDC endpoint on loopback checks ACTIONS_ID_TOKEN_REQUEST_TOKEN and
hands out GitHub-shaped tokens for the audience asked for, signed with a key made here; the
broker's policy trusts that key for the GitHub issuer (a pinned JWK set). Each `run:` step of
action.yml gets its `${{ ... }}` expressions replaced as the runner does (before bash sees the
script), runs under `bash --noprofile --norc -eo pipefail`, and the runner's files
(GITHUB_ENV, each step's GITHUB_OUTPUT) are read back in the runner's formats.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.api.app import create_app
from broker.backends.aws import AwsBackend
from broker.backends.base import BackendRegistry
from broker.client.github_action import heredoc
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.backends.aws.conftest import (  # noqa: F401 (fixtures)
    REGION,
    ROLE_ARN,
    S3_PREFIX,
    Moto,
    capturing_session,
    moto,
    moto_server,
)
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer, free_port

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
GITHUB = "https://token.actions.githubusercontent.com"
RUNNER_BEARER = "runner-request-" + uuid.uuid4().hex
EXPRESSION = re.compile(r"\$\{\{\s*([a-z_]+)\.([A-Za-z0-9_.-]+)\s*\}\}")

POLICY = f"""
issuers:
  - name: github
    issuer: {GITHUB}
    audiences: [model-broker]
    jwks_file: github-jwks.json
    single_use: true
actions:
  evaluate: {{tier: low, max_ttl: 1h}}
  fine-tune: {{tier: elevated, max_ttl: 4h, approvals: 1}}
models:
  llama-7b:
    backends:
      aws: {{role_arn: "{ROLE_ARN}", s3_prefix: "{S3_PREFIX}"}}
rules:
  - name: nightly-eval
    issuer: github
    subject: "{EVAL_SUB}"
    claims: {{job_workflow_ref: "{EVAL_WORKFLOW}"}}
    models: [llama-7b]
    actions: [evaluate]
    backends: [jwt, aws]
"""


@dataclass
class Runner:
    """The runner's OIDC endpoint: what it was asked and what it handed out."""

    url: str
    audiences: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    refused: int = 0
    mint: Callable[[str], str] | None = None
    """Makes the token for an audience; default: GitHub's shape, signed with ``github_key``."""


@pytest.fixture
def github_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def runner(github_key: rsa.RSAPrivateKey) -> Iterator[Runner]:
    state = Runner(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {RUNNER_BEARER}":
                state.refused += 1
                self.send_response(401)
                self.end_headers()
                return
            audience = parse_qs(urlsplit(self.path).query).get("audience", [""])[0]
            state.audiences.append(audience)
            now = int(time.time())
            claims = {
                "iss": GITHUB,
                "aud": audience,
                "sub": EVAL_SUB,
                "repository": "acme/evals",
                "repository_owner_id": "42",
                "ref": "refs/heads/main",
                "job_workflow_ref": EVAL_WORKFLOW,
                "jti": uuid.uuid4().hex,
                "iat": now,
                "nbf": now,
                "exp": now + 300,
            }
            token = (
                state.mint(audience)
                if state.mint
                else jwt.encode(claims, github_key, algorithm="RS256", headers={"kid": "gh-1"})
            )
            state.issued.append(token)
            body = json.dumps({"count": 1, "value": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/_apis/token?api-version=2.0"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def github_broker(tmp_path: Path, key: rsa.RSAPrivateKey) -> Broker:
    """A production-mode broker whose policy trusts ``key`` for GitHub's issuer."""
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "github-jwks.json").write_text(
        json.dumps({"keys": [{**jwk, "kid": "gh-1", "alg": "RS256", "use": "sig"}]})
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings = Settings(data_dir=tmp_path / "data", policy=policy, port=free_port())
    return build_broker(settings)


@pytest.fixture
def live(tmp_path: Path, github_key: rsa.RSAPrivateKey) -> Iterator[tuple[LiveServer, Broker]]:
    broker = github_broker(tmp_path, github_key)
    try:
        with LiveServer(create_app(broker=broker), broker.settings.port) as server:
            yield server, broker
    finally:
        broker.close()


@dataclass
class Run:
    code: int
    log: str
    """stdout and stderr as the runner's log has them (one stream)."""
    env: dict[str, str]
    outputs: dict[str, str]


def read_runner_file(path: Path) -> dict[str, str]:
    """``NAME=value`` and ``NAME<<DELIMITER`` blocks, parsed as the runner parses them."""
    values: dict[str, str] = {}
    lines = path.read_text().split("\n") if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        eq, here = line.find("="), line.find("<<")
        if eq >= 0 and (here < 0 or eq < here):
            values[line[:eq]] = line[eq + 1 :]
            continue
        assert here > 0, f"not a runner file line: {line!r}"
        name, delimiter, body = line[:here], line[here + 2 :], []
        while lines[i] != delimiter:  # IndexError: an unterminated block
            body.append(lines[i])
            i += 1
        i += 1
        values[name] = "\n".join(body)
    return values


def expand(text: str, contexts: dict[str, dict[str, str]]) -> str:
    """``${{ context.name }}`` replaced by its value, textually, as the runner does before a
    script runs (which is why an input must never appear in a script's text)."""

    def value(m: re.Match[str]) -> str:
        context, name = m.group(1), m.group(2)
        if context == "steps":
            step, _, output = name.partition(".outputs.")
            return contexts["steps"].get(f"{step}.{output}", "")
        assert name in contexts[context], f"unknown expression {m.group(0)}"
        return contexts[context][name]

    return EXPRESSION.sub(value, text)


def run_action(tmp_path: Path, runner: Runner, **inputs: str) -> Run:
    """Every step of action.yml in order, as a GitHub runner runs a composite action."""
    action = yaml.safe_load(ACTION.read_text())
    given = {name: spec.get("default", "") for name, spec in action["inputs"].items()}
    unknown = set(inputs) - set(given)
    assert not unknown, f"action.yml has no inputs {unknown}"
    given.update(inputs)
    for name, spec in action["inputs"].items():
        assert given[name] or not spec.get("required"), f"input {name} is required"
    work = tmp_path / "runner"
    temp = work / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    github_env = work / "github_env"
    github_env.touch()
    contexts: dict[str, dict[str, str]] = {
        "inputs": given,
        "github": {"action_path": str(ROOT)},
        "steps": {},
    }
    base = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "RUNNER_TEMP": str(temp),
        "GITHUB_ACTIONS": "true",
        "GITHUB_ENV": str(github_env),
        "GITHUB_ACTION_PATH": str(ROOT),
        "ACTIONS_ID_TOKEN_REQUEST_URL": runner.url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": RUNNER_BEARER,
    }
    log, code = [], 0
    for n, step in enumerate(action["runs"]["steps"]):
        assert step.get("shell") == "bash", "every step says its shell"
        script = work / f"step-{n}.sh"
        script.write_text(expand(step["run"], contexts))
        output = work / f"step-{n}-output"
        output.touch()
        env = {**base, **read_runner_file(github_env), "GITHUB_OUTPUT": str(output)}
        env.update({k: expand(str(v), contexts) for k, v in step.get("env", {}).items()})
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            check=False,
            env=env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        log.append(done.stdout)
        for name, value in read_runner_file(output).items():
            contexts["steps"][f"{step.get('id', n)}.{name}"] = value
        if done.returncode != 0:
            code = done.returncode
            break
    outputs = {name: expand(spec["value"], contexts) for name, spec in action["outputs"].items()}
    return Run(code, "".join(log), read_runner_file(github_env), outputs)


def assert_masked_first(log: str, secret: str) -> None:
    """The first log line that holds ``secret`` is its own ``::add-mask::``."""
    lines = log.splitlines()
    holding = [i for i, line in enumerate(lines) if secret in line]
    assert holding, "the secret never reached the log, not even as a mask"
    assert lines[holding[0]] == f"::add-mask::{secret}", f"line {holding[0]} shows it unmasked"


def test_a_broker_jwt_is_masked_exported_and_output(
    live: tuple[LiveServer, Broker], runner: Runner, tmp_path: Path
) -> None:
    server, _ = live
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": "llama-7b", "action": "evaluate"},
        ttl="10m",
        python=sys.executable,
    )
    assert run.code == 0, run.log
    assert runner.audiences == ["model-broker"] and runner.refused == 0
    token = run.env["BROKER_JWT"]
    assert_masked_first(run.log, token)
    assert_masked_first(run.log, runner.issued[0])  # the runner's OIDC token is a secret too
    assert run.outputs["grant-id"] == run.env["BROKER_GRANT_ID"]
    assert run.outputs["grant-id"].startswith("g_")
    assert run.outputs["expires-at"] == run.env["BROKER_EXPIRES_AT"]
    assert run.outputs["issued-token-type"] == "urn:ietf:params:oauth:token-type:jwt"
    key = jwt.PyJWKClient(f"{server.url}/.well-known/jwks.json").get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key, algorithms=["ES256"], options={"verify_aud": False})
    assert claims["exp"] - claims["iat"] == 600 and claims["sub"] == EVAL_SUB


@pytest.fixture
def aws(moto: Moto) -> Moto:  # noqa: F811 (the imported fixture)
    """moto's STS and IAM, with the broker's AWS environment pointing at it."""
    return moto


def test_aws_credentials_are_masked_and_exported(
    tmp_path: Path, runner: Runner, github_key: rsa.RSAPrivateKey, aws: Moto
) -> None:
    broker = github_broker(tmp_path, github_key)
    backends = {b.name: b for b in broker.grants.backends.all()}
    backends["aws"] = AwsBackend(broker.policy, session=capturing_session(aws))
    broker.grants.backends = BackendRegistry(backends)
    try:
        with LiveServer(create_app(broker=broker), broker.settings.port) as server:
            run = run_action(
                tmp_path,
                runner,
                **{"broker-url": server.url, "model": "llama-7b", "action": "evaluate"},
                backend="aws",
                python=sys.executable,
            )
    finally:
        broker.close()
    assert run.code == 0, run.log
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    for name in names:
        assert_masked_first(run.log, run.env[name])
    assert run.env["AWS_CREDENTIAL_EXPIRATION"] == run.outputs["expires-at"]
    assert run.outputs["issued-token-type"] == "urn:broker:token-type:aws-credentials"
    session = boto3.Session(
        **{n.lower(): run.env[n] for n in names}, region_name=REGION
    )  # what a later step's AWS SDK does with the exported variables
    arn = session.client("sts", endpoint_url=aws.url).get_caller_identity()["Arn"]
    assert arn.startswith("arn:aws:sts::") and "model-llama-7b" in arn


def test_a_refusal_fails_the_step_and_exports_nothing(
    live: tuple[LiveServer, Broker], runner: Runner, tmp_path: Path
) -> None:
    server, _ = live
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": "llama-7b", "action": "fine-tune"},
        python=sys.executable,
    )
    assert run.code == 1 and run.env == {} and run.outputs["grant-id"] == ""
    assert "::error title=model-broker::access_denied" in run.log
    assert_masked_first(run.log, runner.issued[0])


def test_the_wrong_audience_is_refused_by_the_broker(
    live: tuple[LiveServer, Broker], runner: Runner, tmp_path: Path
) -> None:
    server, _ = live
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": "llama-7b", "action": "evaluate"},
        audience="someone-else",
        python=sys.executable,
    )
    assert runner.audiences == ["someone-else"]
    assert run.code == 1 and "aud" in run.log and run.env == {}


INJECTIONS = ['$(touch "$HOME/pwned")', '"; touch "$HOME/pwned"; echo "', "`touch $HOME/pwned`"]


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_an_input_is_data_not_code(
    live: tuple[LiveServer, Broker], runner: Runner, tmp_path: Path, hostile: str
) -> None:
    server, _ = live
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": hostile, "action": hostile},
        reason=hostile,
        python=sys.executable,
    )
    assert run.code == 1 and run.env == {}
    assert not (tmp_path / "runner" / "pwned").exists()


def test_no_input_is_pasted_into_a_script() -> None:
    """What makes the test above pass: `run:` holds no expression; inputs come through env."""
    action = yaml.safe_load(ACTION.read_text())
    for step in action["runs"]["steps"]:
        assert "${{" not in step["run"]
    passed = "".join(str(v) for s in action["runs"]["steps"] for v in s.get("env", {}).values())
    for name in action["inputs"]:
        assert f"inputs.{name} }}}}" in passed, f"input {name} is not passed to the step"


def test_without_id_token_permission_the_step_says_so(
    live: tuple[LiveServer, Broker], runner: Runner, tmp_path: Path
) -> None:
    server, _ = live
    runner.url = ""  # the runner sets no ACTIONS_ID_TOKEN_REQUEST_URL without id-token: write
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": "llama-7b", "action": "evaluate"},
        python=sys.executable,
    )
    assert run.code == 1 and "id-token: write" in run.log


def test_runner_file_values_survive_newlines_and_lookalike_delimiters(tmp_path: Path) -> None:
    values = {"A": "one\ntwo", "B": "x<<EOF\nEOF", "C": "k=v", "D": ""}
    path = tmp_path / "env"
    path.write_text(heredoc(values))
    assert read_runner_file(path) == values


def test_a_secret_with_percent_or_newlines_is_masked_line_by_line() -> None:
    import io

    from broker.client.github_action import mask

    out = io.StringIO()
    mask(["p%ss\nline2"], out)
    lines = set(out.getvalue().splitlines())
    assert lines == {"::add-mask::p%25ss%0Aline2", "::add-mask::p%25ss", "::add-mask::line2"}


def test_the_action_file_is_what_a_runner_accepts() -> None:
    action: dict[str, Any] = yaml.safe_load(ACTION.read_text())
    assert action["runs"]["using"] == "composite"
    assert set(action["inputs"]) >= {"broker-url", "model", "action", "backend", "audience"}
    assert action["inputs"]["audience"]["default"] == "model-broker"
    for spec in action["outputs"].values():
        assert EXPRESSION.fullmatch(spec["value"]), spec


def test_a_python_older_than_3_11_is_named(
    live: tuple[LiveServer, Broker], runner: Runner, tmp_path: Path
) -> None:
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\nexit 1\n")  # what `sys.exit(sys.version_info < (3, 11))` gives
    old.chmod(0o755)
    server, _ = live
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": "llama-7b", "action": "evaluate"},
        python=str(old),
    )
    assert run.code == 1 and "is not Python 3.11 or later" in run.log and runner.issued == []
