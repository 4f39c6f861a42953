"""A real boto3 profile whose ``credential_process`` prints :func:`credential_process_json`
gets exactly the credentials the broker issued, and they work against moto.

The command here reads a saved ``POST /v1/token`` answer; ``broker aws credential-process``
will produce the same output from a live exchange.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3
import pytest

from broker.backends.aws import AwsBackend
from tests.backends.aws.conftest import REGION, ROLE_NAME, Moto, make_grant

pytestmark = pytest.mark.integration  # moto over HTTP

PRINT_CREDENTIALS = (
    "import json, sys; from broker.backends.aws import credential_process_json; "
    "sys.stdout.write(credential_process_json(json.load(open(sys.argv[1]))))"
)


def test_profile_with_credential_process_gets_the_broker_credentials(
    aws: AwsBackend, moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTE: SDKs re-run credential_process whenever less than 15 minutes are left, so a
    # 15-minute grant would run it before every request; an hour runs it once here.
    grant = make_grant(ttl=3600)
    cred = aws.issue(grant)
    answer = {  # the shape of a POST /v1/token answer for aws-credentials
        "access_token": cred.access_token,
        "issued_token_type": cred.issued_token_type,
        "token_type": cred.token_type,
        "expires_in": 3600,
        "scope": grant.action,
        "grant_id": grant.id,
        **cred.extra,
    }
    saved = tmp_path / "token-response.json"
    saved.write_text(json.dumps(answer))
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile model]\n"
        f'credential_process = {sys.executable} -c "{PRINT_CREDENTIALS}" {saved}\n'
        f"region = {REGION}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    session = boto3.Session(profile_name="model")
    got = session.get_credentials()
    assert got.method == "custom-process"
    frozen = got.get_frozen_credentials()
    issued = cred.extra["aws_credentials"]
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (
        issued["access_key_id"],
        issued["secret_access_key"],
        issued["session_token"],
    )
    who = session.client("sts").get_caller_identity()  # AWS_ENDPOINT_URL: moto
    assert who["Arn"].endswith(f":assumed-role/{ROLE_NAME}/{grant.id}")
