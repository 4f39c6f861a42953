"""The backend's pure parts, no server: names, limits, settings checks, the revocation
policy as data."""

from __future__ import annotations

import datetime as dt
import json

import boto3
import pytest

from broker.backends.aws import (
    AwsBackend,
    RevocationPolicy,
    check_action_ttl,
    credential_process_json,
    policy_chars,
    source_identity,
)
from broker.errors import ConfigError
from tests.backends.aws.conftest import POLICY_YAML, REGION, load

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def test_credential_process_json_refuses_other_credentials() -> None:
    with pytest.raises(ValueError, match="no AWS credentials"):
        credential_process_json({"access_token": "x", "token_type": "Bearer"})


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("system.serviceaccount@x", "system.serviceaccount@x"),
        ("repo:acme/evals:ref:refs/heads/main", "repo_acme_evals_ref_refs_heads_main.1d7c94200f92"),
        ("a", "a.ca978112ca1b"),
    ],
)
def test_source_identity_charset_and_length(subject: str, expected: str) -> None:
    assert source_identity(subject) == expected


def test_source_identity_of_long_subjects_stays_distinct() -> None:
    a, b = "spiffe://example.org/" + "x" * 80 + "/a", "spiffe://example.org/" + "x" * 80 + "/b"
    assert source_identity(a) != source_identity(b)
    for value in (source_identity(a), source_identity(b), source_identity("aws:thing")):
        assert 2 <= len(value) <= 64
        assert all(c.isascii() and (c.isalnum() or c in "_+=,.@-") for c in value)
    assert not source_identity("aws:thing").startswith("aws:")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("s3://models/llama-7b", "must end with '/'"),
        ("s3://models/llama-*/", r"\* \? and \$ are not allowed"),
        ("s3://models/${aws:username}/", r"\* \? and \$ are not allowed"),
    ],
)
def test_unsafe_s3_prefixes_are_refused_at_start(prefix: str, message: str) -> None:
    text = POLICY_YAML.replace("s3://models/llama-7b/", prefix)
    with pytest.raises(ConfigError, match=message):
        AwsBackend(load(text), session=boto3.Session(region_name=REGION))


def test_model_names_must_be_valid_tag_values() -> None:
    text = POLICY_YAML.replace("  llama-7b:\n", "  llama 7b!:\n")
    with pytest.raises(ConfigError, match="cannot be an AWS session tag value"):
        AwsBackend(load(text), session=boto3.Session(region_name=REGION))


def test_check_action_ttl() -> None:
    assert "cannot get aws credentials" in (check_action_ttl(300) or "")
    assert check_action_ttl(900) is None
    assert check_action_ttl(3600) is None
    assert "role chaining" in (check_action_ttl(4 * 3600) or "")
    assert "maximum session" in (check_action_ttl(86400) or "")


def test_policy_round_trips_and_buckets_by_expiry() -> None:
    policy = RevocationPolicy.empty()
    for n, minutes in enumerate((11, 13, 50)):
        policy.add_grant(f"g_{n}", NOW + dt.timedelta(minutes=minutes))
    assert len(policy.grants) == 2  # 11 and 13 minutes (+5) share the bucket ending at 12:30
    again = RevocationPolicy.parse(json.dumps(policy.to_document()))
    assert again.to_document() == policy.to_document()
    assert RevocationPolicy.parse(None).to_document() == RevocationPolicy.empty().to_document()


def test_a_cutoff_written_by_hand_in_epoch_seconds_is_understood() -> None:
    document = RevocationPolicy.empty().to_document()
    document["Statement"][0]["Sid"] = "BrokerRevokedIssuedBeforeUntil1893499200"
    document["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"] = "1893456000"
    assert RevocationPolicy.parse(document).cutoff == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_cutoff_rounds_up_to_the_next_second() -> None:
    policy = RevocationPolicy.empty()
    policy.revoke_issued_before(NOW + dt.timedelta(microseconds=1), NOW)
    assert policy.cutoff == NOW + dt.timedelta(seconds=1)


def test_parse_keeps_what_it_does_not_know_and_refuses_what_is_no_policy() -> None:
    odd = {"Sid": "BrokerRevokedGrantsUntil1", "Effect": "Deny", "Action": "*", "Resource": "*"}
    single = {"Version": "2012-10-17", "Statement": odd}
    assert RevocationPolicy.parse(single).foreign == [odd]
    with pytest.raises(ValueError):
        RevocationPolicy.parse("{not json")


def test_policy_size_counts_no_whitespace() -> None:
    document = {"Version": "2012-10-17", "Statement": [{"Sid": "A", "Effect": "Deny"}]}
    assert policy_chars(document) == len(json.dumps(document, separators=(",", ":")))
    assert policy_chars(json.loads(json.dumps(document, indent=4))) == policy_chars(document)
