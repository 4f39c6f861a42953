"""moto's server over real HTTP, the broker's AWS environment, and a policy with aws models.

One ``ThreadedMotoServer`` on a free loopback port serves the whole session (always stopped);
every test starts from a reset server. The broker reaches it the way it reaches AWS: boto3's
default credential chain from the environment, ``AWS_ENDPOINT_URL`` and ``AWS_REGION``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from broker.backends.aws import AwsBackend
from broker.grants.model import Grant
from broker.policy import LoadedPolicy, parse_policy
from tests.backends.conformance import make_grant as conformance_grant

ACCOUNT = "123456789012"
REGION = "eu-west-1"
MODEL = "llama-7b"
ROLE_NAME = "model-llama-7b"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE_NAME}"
S3_PREFIX = "s3://models/llama-7b/"
SUBJECT = "repo:acme/evals:ref:refs/heads/main"

ROOT = Path(__file__).resolve().parents[3]
CHECK = ROOT / "terraform" / "check.sh"
MODULE = ROOT / "terraform" / "aws"
TERRAFORM = shutil.which("terraform")

POLICY_YAML = f"""
issuers:
  - name: github
    issuer: https://token.actions.githubusercontent.com
    audiences: [model-broker]
actions:
  evaluate:       {{tier: low,        max_ttl: 1h}}
  fine-tune:      {{tier: elevated,   max_ttl: 4h,  approvals: 1}}
  deploy-weights: {{tier: privileged, max_ttl: 15m, approvals: 2}}
models:
  {MODEL}:
    backends:
      aws: {{role_arn: "{ROLE_ARN}", s3_prefix: "{S3_PREFIX}"}}
  mistral-7b: {{}}
rules: []
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(text: str = POLICY_YAML) -> LoadedPolicy:
    return parse_policy(text, source="aws-test.yaml", base_dir=Path("."))


def make_grant(**overrides: Any) -> Grant:
    """The shared conformance grant, for evaluate by the GitHub workflow through aws; ``ttl``
    (seconds, default 900) sets ``expires_at``."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued_at = overrides.pop("issued_at", now)
    ttl = overrides.pop("ttl", 900)
    fields: dict[str, Any] = {
        "issuer": "github",
        "issuer_url": "https://token.actions.githubusercontent.com",
        "subject": SUBJECT,
        "action": "evaluate",
        "tier": "low",
        "backend": "aws",
        "rule": "nightly-eval",
        "issued_at": issued_at,
        "expires_at": issued_at + dt.timedelta(seconds=ttl),
    }
    fields.update(overrides)
    return conformance_grant(**fields)


@dataclass
class Moto:
    url: str
    assume_role_calls: list[dict[str, Any]] = field(default_factory=list)
    """The AssumeRole parameters the broker passed to boto3."""
    wire: list[dict[str, Any]] = field(default_factory=list)
    """The same calls as serialised for the HTTP request to moto (query protocol fields)."""

    def admin(self, service: str) -> Any:
        """A client for test setup and read-back, independent of the broker's session."""
        return boto3.Session(
            aws_access_key_id="setup", aws_secret_access_key="setup", region_name=REGION
        ).client(service, endpoint_url=self.url)

    def set_auth(self, free_requests: float) -> None:
        """moto's IAM authorisation: after ``free_requests`` requests, check every request's
        signature and the caller's identity policies (``inf`` turns it off)."""
        httpx.post(f"{self.url}/moto-api/reset-auth", content=str(free_requests)).raise_for_status()

    def recorded_sessions(self) -> list[Any]:
        """What moto's STS kept of each AssumeRole (it keeps the policy, not tags)."""
        from moto.sts.models import sts_backends

        return list(sts_backends[ACCOUNT]["aws"].assumed_roles)

    def credential_works(self, credentials: dict[str, str]) -> bool:
        """Whether ``credentials`` (a token response's ``aws_credentials``) still open their
        session: moto's STS must authenticate them, and none of the role's policies, as moto
        stores them, may deny the session.

        NOTE: moto does not evaluate policy conditions for STS sessions, so the second half
        applies IAM's documented semantics here, for exactly the condition keys the broker
        writes (the session's ``grant_id`` tag as sent, its issue time). Real AWS is the only
        full proof (docs/backends/aws.md).
        """
        session = boto3.Session(
            aws_access_key_id=credentials["access_key_id"],
            aws_secret_access_key=credentials["secret_access_key"],
            aws_session_token=credentials["session_token"],
            region_name=REGION,
        )
        arn = session.client("sts", endpoint_url=self.url).get_caller_identity()["Arn"]
        call = next(c for c in self.assume_role_calls if arn.endswith(f"/{c['RoleSessionName']}"))
        expiration = dt.datetime.fromisoformat(credentials["expiration"].replace("Z", "+00:00"))
        issued = expiration - dt.timedelta(seconds=call["DurationSeconds"])
        tags = {t["Key"]: t["Value"] for t in call["Tags"]}
        iam = self.admin("iam")
        role = call["RoleArn"].rsplit("/", 1)[1]
        documents = [
            iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
            for name in iam.list_role_policies(RoleName=role)["PolicyNames"]
        ]
        statements = [st for doc in documents for st in _statements(doc)]
        return not any(_denies(st, tags, issued) for st in statements)

    def revocation_policy(self, role: str = ROLE_NAME) -> dict[str, Any]:
        doc = self.admin("iam").get_role_policy(RoleName=role, PolicyName="broker-revocations")
        return dict(doc["PolicyDocument"])


def _statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    statements = document["Statement"]
    return [statements] if isinstance(statements, dict) else list(statements)


def _denies(statement: dict[str, Any], tags: dict[str, str], issued: dt.datetime) -> bool:
    """IAM's answer for one identity-policy statement and a session: does it deny everything
    (the only Deny shape the broker writes) with all its conditions true?"""
    if statement["Effect"] != "Deny":
        return False
    assert statement["Action"] == "*" and statement["Resource"] == "*", statement
    for operator, tests in statement.get("Condition", {}).items():
        for key, expected in tests.items():
            values = [expected] if isinstance(expected, str) else expected
            if operator == "StringEquals" and key.startswith("aws:PrincipalTag/"):
                holds = tags.get(key.removeprefix("aws:PrincipalTag/")) in values
            elif operator == "DateLessThan" and key == "aws:TokenIssueTime":
                cutoff = dt.datetime.fromisoformat(values[0].replace("Z", "+00:00"))
                holds = issued < cutoff
            else:
                raise AssertionError(f"this evaluator does not know {operator} {key}")
            if not holds:
                return False
    return True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def create_model_role(moto: Moto, name: str = ROLE_NAME) -> None:
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
            }
        ],
    }
    moto.admin("iam").create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))


@pytest.fixture
def moto(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Moto:
    """A reset moto with the model's role, and the broker's AWS environment pointing at it."""
    httpx.post(f"{moto_server}/moto-api/reset").raise_for_status()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "broker-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "broker-test-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    m = Moto(url=moto_server)
    create_model_role(m)
    return m


def capturing_session(moto: Moto) -> boto3.Session:
    """A default-chain session that records the exact AssumeRole parameters it sends."""
    session = boto3.Session()

    def record(params: dict[str, Any], **_: Any) -> None:
        moto.assume_role_calls.append(dict(params))

    def record_wire(params: dict[str, Any], **_: Any) -> None:
        moto.wire.append(dict(params["body"]))

    session.events.register("provide-client-params.sts.AssumeRole", record)
    session.events.register("before-call.sts.AssumeRole", record_wire)
    return session


@pytest.fixture
def policy() -> LoadedPolicy:
    return load()


@pytest.fixture
def aws(moto: Moto, policy: LoadedPolicy) -> AwsBackend:
    return AwsBackend(policy, session=capturing_session(moto))


@dataclass
class CheckRun:
    process: subprocess.Popen[bytes]
    log: Path

    def result(self) -> tuple[int, str]:
        code = self.process.wait(timeout=300)
        return code, self.log.read_text()


@pytest.fixture(scope="session", autouse=True)
def terraform_check(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CheckRun | None]:
    """terraform/check.sh, started in the background (its own process group) at the start of
    the session when test_terraform.py's check test is selected: loading the aws provider
    takes seconds, which the other tests can use. Stopped at the end if still running."""
    wanted = any(
        item.nodeid.endswith("test_check_script_passes_and_leaves_no_state_in_the_repo")
        for item in request.session.items
    )
    if TERRAFORM is None or not wanted:
        yield None
        return
    log = tmp_path_factory.mktemp("terraform-check") / "check.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CHECK)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield CheckRun(process, log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
