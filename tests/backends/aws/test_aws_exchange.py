"""The aws backend wired into the broker: exchange over HTTP, revocation recorded in IAM and
in the audit log, `broker aws credential-process` as a real boto3 profile's credential source,
and `broker policy check` warnings."""

from __future__ import annotations

import json
import shlex
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import CredentialRetrievalError
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.api.app import create_app
from broker.backends.aws import AwsBackend
from broker.backends.base import BackendRegistry
from broker.cli.main import main
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import EventRow
from tests.backends.aws.conftest import REGION, ROLE_NAME, Moto, capturing_session
from tests.conftest import (
    EVAL_SUB,
    EVAL_WORKFLOW,
    LiveServer,
    exchange_form,
    free_port,
    person_token,
)

pytestmark = pytest.mark.integration
AWS = "urn:broker:token-type:aws-credentials"


def dev_broker(data_dir: Path, port: int = 8080) -> Broker:
    return build_broker(Settings(dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, port=port))


def eval_token(broker: Broker) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})


@pytest.fixture
def served(moto: Moto, tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    broker = dev_broker(tmp_path / "data")
    assert isinstance(broker.grants.backends.get("aws"), AwsBackend)  # wired from the policy
    # The same backend, with a session that records what it sends (to judge the credentials).
    backends = {b.name: b for b in broker.grants.backends.all()}
    backends["aws"] = AwsBackend(broker.policy, session=capturing_session(moto))
    broker.grants.backends = BackendRegistry(backends)
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def test_exchange_for_aws_credentials_then_revoke(
    served: tuple[TestClient, Broker], moto: Moto
) -> None:
    client, broker = served
    token = eval_token(broker)
    resp = client.post("/v1/token", data=exchange_form(token, requested_token_type=AWS))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    creds = body["aws_credentials"]
    assert body["issued_token_type"] == AWS and body["token_type"] == "N_A"
    assert body["access_token"] == creds["session_token"]
    assert token not in json.dumps(body)
    assert moto.credential_works(creds)
    identity = (
        boto3.Session(
            aws_access_key_id=creds["access_key_id"],
            aws_secret_access_key=creds["secret_access_key"],
            aws_session_token=creds["session_token"],
            region_name=REGION,
        )
        .client("sts", endpoint_url=moto.url)
        .get_caller_identity()
    )
    assert identity["Arn"].endswith(f"assumed-role/{ROLE_NAME}/{body['grant_id']}")

    admin = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
    revoked = client.post(
        f"/v1/grants/{body['grant_id']}/revoke", json={"reason": "leak"}, headers=admin
    )
    assert revoked.status_code == 200 and revoked.json()["backend_revocation"] == "confirmed"
    assert body["grant_id"] in json.dumps(moto.revocation_policy())
    assert not moto.credential_works(creds)
    with broker.store.read() as s:
        events = [
            json.loads(b)
            for b in s.scalars(select(EventRow.body).where(EventRow.grant_id == body["grant_id"]))
        ]
    confirmed = next(e for e in events if e["type"] == "grant.backend_revocation_confirmed")
    assert confirmed["details"]["method"] and confirmed["details"]["fallback"] is False


def test_sts_unreachable_answers_503_naming_aws(
    tmp_path: Path, moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    broker = dev_broker(tmp_path / "data")
    with TestClient(create_app(broker=broker)) as client:
        resp = client.post(
            "/v1/token", data=exchange_form(eval_token(broker), requested_token_type=AWS)
        )
        assert resp.status_code == 503 and "aws" in resp.json()["error_description"]
        admin = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
        assert (
            client.get("/v1/grants", params={"status": "active"}, headers=admin).json()["grants"]
            == []
        )


def test_credential_process_feeds_a_real_boto3_profile(
    moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two aws-cli-style runs (each a new session running the command) with one single-use
    token both get credentials: the second from the 0600 cache, not a replayed exchange."""
    port = free_port()
    broker = dev_broker(tmp_path / "data", port=port)
    cache = tmp_path / "cache"
    with LiveServer(create_app(broker=broker), port) as server:
        token_file = tmp_path / "workload.jwt"
        token_file.write_text(eval_token(broker))  # the dev issuer's tokens are single-use
        command = (
            f"{sys.executable} -m broker.cli.main aws credential-process --url {server.url} "
            f"--model llama-7b --action evaluate --token-file {token_file} --cache-dir {cache}"
        )
        config = tmp_path / "aws-config"
        config.write_text(f"[profile model]\ncredential_process = {command}\nregion = {REGION}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))

        def run() -> tuple[str, str]:
            session = boto3.Session(profile_name="model")
            frozen = session.get_credentials().get_frozen_credentials()
            arn = session.client("sts", endpoint_url=moto.url).get_caller_identity()["Arn"]
            return frozen.access_key, arn

        first, arn = run()
        assert f"assumed-role/{ROLE_NAME}/g_" in arn
        (cached,) = cache.iterdir()
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert stat.S_IMODE(cached.stat().st_mode) == 0o600
        assert run() == (first, arn)
        assert len(grant_ids(broker)) == 1

        # NOTE: a cache file others could have written is not trusted: this run exchanges
        # again, and the single-use token is refused as replayed.
        cached.chmod(0o644)
        with pytest.raises(CredentialRetrievalError, match="replayed"):
            run()
        assert len(grant_ids(broker)) == 1


def grant_ids(broker: Broker) -> list[str]:
    with broker.store.read() as session:
        rows = session.scalars(select(EventRow).where(EventRow.type == "exchange.allowed"))
        return [str(row.grant_id) for row in rows]


def test_the_cli_prints_every_part_of_aws_credentials(
    moto: Moto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`broker token exchange --backend aws` prints the access key, secret and session token
    (not a lone session token), in the text format and as `--format env`; both work."""
    port = free_port()
    broker = dev_broker(tmp_path / "data", port=port)
    token = tmp_path / "workload.jwt"
    with LiveServer(create_app(broker=broker), port) as server:
        common = ["token", "exchange", "--token", str(token), "--url", server.url]
        common += ["--model", "llama-7b", "--action", "evaluate", "--backend", "aws"]
        parts: list[dict[str, str]] = []
        for fmt, sep in (("text", "  "), ("env", "=")):
            token.write_text(eval_token(broker))
            assert main([*common, "--format", fmt]) == 0
            out = capsys.readouterr().out
            parts.append({k: v.strip() for k, v in (ln.split(sep, 1) for ln in out.splitlines())})
    text, env = parts
    assert text["access_key_id"].startswith("ASIA") and text["expires_at"].endswith("Z")

    def arn(key: str, secret: str, session_token: str) -> str:
        sts = boto3.Session(
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            aws_session_token=session_token,
            region_name=REGION,
        ).client("sts", endpoint_url=moto.url)
        return str(sts.get_caller_identity()["Arn"])

    got = arn(text["access_key_id"], text["secret_access_key"], text["session_token"])
    assert got.endswith(f"assumed-role/{ROLE_NAME}/{text['grant_id']}")
    env = {k: shlex.split(v)[0] for k, v in env.items()}
    got = arn(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"])
    assert got.endswith(f"assumed-role/{ROLE_NAME}/{env['BROKER_GRANT_ID']}")
    assert env["AWS_CREDENTIAL_EXPIRATION"].endswith("Z")


def test_credential_process_fails_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "t.jwt"
    token_file.write_text("not-a-token")
    code = main(
        [
            "aws",
            "credential-process",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--model",
            "llama-7b",
            "--action",
            "evaluate",
            "--token-file",
            str(token_file),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 3 and out == "" and "unreachable" in err


def test_policy_check_warns_about_ttls_aws_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/"
    )
    text = text.replace(
        "evaluate:           {tier: low,        max_ttl: 1h}",
        "evaluate:           {tier: low,        max_ttl: 10m}",
    )
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    assert main(["policy", "check", str(policy), "--dev", "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert (
        len(warnings) == 1 and "actions.evaluate (aws)" in warnings[0] and "minimum" in warnings[0]
    )
    assert main(["policy", "check", str(EXAMPLE_POLICY), "--dev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
