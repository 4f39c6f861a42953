"""The composite GitHub Action (action.yml) run as the runner runs it, against a live broker.

The runner's OIDC endpoint and the steps' execution are tests/github_runner.py's; the broker's
policy trusts the stand-in's key for GitHub's issuer (a pinned JWK set). Checked afterwards:
GITHUB_ENV, the outputs, and the log (every secret masked before anything else shows it).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.api.app import create_app
from broker.backends.aws import AwsBackend
from broker.backends.base import BackendRegistry
from broker.client.github_action import heredoc, mask
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
from tests.github_runner import (
    ACTION,
    EXPRESSION,
    GITHUB,
    Runner,
    assert_masked_first,
    read_runner_file,
    run_action,
    serve_runner,
)


@pytest.fixture
def github_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def runner(github_key: rsa.RSAPrivateKey) -> Iterator[Runner]:
    with serve_runner(github_key) as state:
        yield state


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
