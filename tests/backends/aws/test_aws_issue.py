"""Issuing: the exact AssumeRole the broker sends to moto over HTTP, and its failures.

moto accepts but does not evaluate session policies, session tags, source identity or trust
conditions, so these tests check what the broker *sends* (captured from boto3's own event
hooks, and the session policy also as moto recorded it); docs/backends/aws.md lists what only
real AWS enforces.
"""

from __future__ import annotations

import datetime as dt
import json

import boto3
import pytest

from broker.backends.aws import (
    AwsBackend,
    S3Access,
    credential_process_json,
    source_identity,
)
from broker.backends.base import TOKEN_TYPE_AWS
from broker.errors import AccessDenied, BackendUnavailable, InvalidRequest
from tests.backends.aws.conftest import (
    ACCOUNT,
    REGION,
    ROLE_ARN,
    ROLE_NAME,
    SUBJECT,
    Moto,
    capturing_session,
    free_port,
    load,
    make_grant,
)

pytestmark = pytest.mark.integration  # moto over HTTP

READ_STATEMENTS = [
    {
        "Sid": "ReadModelObjects",
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": ["arn:aws:s3:::models/llama-7b/*"],
    },
    {
        "Sid": "ListModelPrefix",
        "Effect": "Allow",
        "Action": ["s3:ListBucket"],
        "Resource": ["arn:aws:s3:::models"],
        "Condition": {"StringLike": {"s3:prefix": ["llama-7b/", "llama-7b/*"]}},
    },
]


def test_assume_role_parameters_are_exact(aws: AwsBackend, moto: Moto) -> None:
    grant = make_grant(ttl=1800)
    aws.issue(grant)
    (call,) = moto.assume_role_calls
    assert json.loads(call.pop("Policy")) == {"Version": "2012-10-17", "Statement": READ_STATEMENTS}
    assert call == {
        "RoleArn": ROLE_ARN,
        "RoleSessionName": grant.id,
        "DurationSeconds": 1800,
        "Tags": [
            {"Key": "grant_id", "Value": grant.id},
            {"Key": "model", "Value": "llama-7b"},
            {"Key": "action", "Value": "evaluate"},
            {"Key": "tier", "Value": "low"},
        ],
        "TransitiveTagKeys": ["grant_id", "model", "action", "tier"],
        "SourceIdentity": source_identity(SUBJECT),
    }


def test_tags_and_source_identity_go_over_the_wire(aws: AwsBackend, moto: Moto) -> None:
    grant = make_grant()
    aws.issue(grant)
    (body,) = moto.wire
    assert body["Tags.member.1.Key"] == "grant_id" and body["Tags.member.1.Value"] == grant.id
    assert body["Tags.member.4.Key"] == "tier" and body["Tags.member.4.Value"] == "low"
    assert body["TransitiveTagKeys.member.3"] == "action"
    assert body["SourceIdentity"] == "repo_acme_evals_ref_refs_heads_main.1d7c94200f92"
    assert body["RoleSessionName"] == grant.id


def test_moto_recorded_the_session_policy_and_the_credentials_work(
    aws: AwsBackend, moto: Moto
) -> None:
    grant = make_grant()
    cred = aws.issue(grant)
    (session,) = moto.recorded_sessions()
    assert json.loads(session.policy)["Statement"] == READ_STATEMENTS
    assert session.role_arn == ROLE_ARN and session.session_name == grant.id
    creds = cred.extra["aws_credentials"]
    as_workload = boto3.Session(
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=creds["secret_access_key"],
        aws_session_token=creds["session_token"],
        region_name=REGION,
    )
    who = as_workload.client("sts", endpoint_url=moto.url).get_caller_identity()
    assert who["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE_NAME}/{grant.id}"


def test_credential_shape_for_the_token_response(aws: AwsBackend) -> None:
    grant = make_grant()
    cred = aws.issue(grant)
    creds = cred.extra["aws_credentials"]
    assert set(creds) == {"access_key_id", "secret_access_key", "session_token", "expiration"}
    assert cred.access_token == creds["session_token"]
    assert cred.token_type == "N_A" and cred.issued_token_type == TOKEN_TYPE_AWS
    assert cred.credential_ref == grant.id
    expiration = dt.datetime.fromisoformat(creds["expiration"].replace("Z", "+00:00"))
    assert abs((expiration - grant.expires_at).total_seconds()) < 60
    process = json.loads(credential_process_json(cred))
    assert process == {
        "Version": 1,
        "AccessKeyId": creds["access_key_id"],
        "SecretAccessKey": creds["secret_access_key"],
        "SessionToken": creds["session_token"],
        "Expiration": creds["expiration"],
    }
    assert credential_process_json({"aws_credentials": creds, "grant_id": grant.id}) == (
        credential_process_json(cred)
    )


def test_fine_tune_may_also_write_checkpoints(aws: AwsBackend, moto: Moto) -> None:
    aws.issue(make_grant(action="fine-tune", tier="elevated"))
    statements = json.loads(moto.assume_role_calls[0]["Policy"])["Statement"]
    assert statements[:2] == READ_STATEMENTS
    assert statements[2] == {
        "Sid": "WriteModelObjects",
        "Effect": "Allow",
        "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
        "Resource": ["arn:aws:s3:::models/llama-7b/checkpoints/*"],
    }


def test_other_actions_only_read(aws: AwsBackend, moto: Moto) -> None:
    aws.issue(make_grant(action="deploy-weights", tier="privileged"))
    assert json.loads(moto.assume_role_calls[0]["Policy"])["Statement"] == READ_STATEMENTS


def test_action_access_can_be_configured(moto: Moto) -> None:
    access = {"deploy-weights": S3Access(read=("staging/",), write=("weights/",))}
    aws = AwsBackend(load(), session=capturing_session(moto), action_access=access)
    aws.issue(make_grant(action="deploy-weights", tier="privileged"))
    statements = json.loads(moto.assume_role_calls[0]["Policy"])["Statement"]
    assert statements[0]["Resource"] == ["arn:aws:s3:::models/llama-7b/staging/*"]
    assert statements[1]["Condition"]["StringLike"]["s3:prefix"] == [
        "llama-7b/staging/",
        "llama-7b/staging/*",
    ]
    assert statements[2]["Resource"] == ["arn:aws:s3:::models/llama-7b/weights/*"]


def test_ttl_below_the_sts_floor_is_refused_before_any_call(aws: AwsBackend, moto: Moto) -> None:
    with pytest.raises(InvalidRequest, match=r"TTL is 899s .* at least 900s"):
        aws.issue(make_grant(ttl=899))
    with pytest.raises(InvalidRequest, match="at most 43200s"):
        aws.issue(make_grant(ttl=43201))
    assert moto.assume_role_calls == [] and moto.recorded_sessions() == []


def test_model_without_aws_settings_is_refused(aws: AwsBackend) -> None:
    with pytest.raises(InvalidRequest, match="mistral-7b has no aws backend"):
        aws.issue(make_grant(model="mistral-7b"))


def test_sts_unreachable_is_backend_unavailable(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    aws = AwsBackend(load())
    with pytest.raises(BackendUnavailable, match=r"^aws: STS AssumeRole failed: EndpointConnect"):
        aws.issue(make_grant())


def test_ready_when_sts_answers(aws: AwsBackend) -> None:
    assert aws.ready() is None


def test_ready_names_an_unreachable_sts(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    aws = AwsBackend(load())
    try:
        problem = aws.ready()
        assert problem is not None
        assert problem.startswith("aws: STS GetCallerIdentity failed: EndpointConnectionError")
    finally:
        aws.close()


def test_ready_names_credentials_sts_refuses(moto: Moto) -> None:
    aws = AwsBackend(load())
    moto.set_auth(0)  # from now on moto checks every request's signature
    try:
        assert aws.ready() == "aws: STS GetCallerIdentity failed: InvalidClientTokenId"
    finally:
        moto.set_auth(float("inf"))
        aws.close()


def test_sts_access_denied_is_403_naming_the_aws_code(moto: Moto) -> None:
    """moto's own IAM authorisation refuses a principal without sts:AssumeRole."""
    iam = moto.admin("iam")
    iam.create_user(UserName="not-the-broker")
    key = iam.create_access_key(UserName="not-the-broker")["AccessKey"]
    session = boto3.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    )
    aws = AwsBackend(load(), session=session)
    moto.set_auth(0)
    try:
        with pytest.raises(AccessDenied) as caught:
            aws.issue(make_grant())
    finally:
        moto.set_auth(float("inf"))
    assert caught.value.status == 403
    assert "AccessDenied" in caught.value.description
    assert caught.value.to_wire()["aws_error"] == "AccessDenied"
    assert "not-the-broker" not in caught.value.description  # AWS's message stays in the log
    assert moto.recorded_sessions() == []


def test_duration_over_the_role_maximum_asks_for_a_shorter_ttl(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STS's answer when DurationSeconds exceeds MaxSessionDuration (moto does not check it),
    served as STS serves it: an HTTP 400 with STS's XML error body."""
    from botocore.awsrequest import AWSResponse

    body = (
        b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        b"<Type>Sender</Type><Code>ValidationError</Code><Message>The requested "
        b"DurationSeconds exceeds the MaxSessionDuration set for this role.</Message></Error>"
        b"<RequestId>r</RequestId></ErrorResponse>"
    )

    class Raw:
        def stream(self, **_: object) -> list[bytes]:
            return [body]

    session = boto3.Session()
    session.events.register(
        "before-send.sts.AssumeRole",
        lambda request, **_: AWSResponse(request.url, 400, {}, Raw()),
    )
    aws = AwsBackend(load(), session=session)
    with pytest.raises(InvalidRequest, match=r"ValidationError.*shorter requested_ttl"):
        aws.issue(make_grant(ttl=7200))


def test_default_session_honours_aws_region_and_endpoint(moto: Moto) -> None:
    aws = AwsBackend(load())
    assert aws._sts.meta.region_name == REGION
    assert aws._sts.meta.endpoint_url == moto.url
    aws.issue(make_grant())
    assert moto.recorded_sessions()[0].region_name == REGION
