"""The grant as the broker sees it: a frozen copy of its row whose status reads expiry."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from broker.grants.model import Grant, GrantStatus
from broker.store.tables import GrantRow

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def row(status: str = "active", expires_in: int = 900, **fields: object) -> GrantRow:
    values: dict[str, object] = dict(
        id="g_1",
        issuer="cluster",
        issuer_url="https://kubernetes.default.svc",
        subject="system:serviceaccount:training:trainer",
        identity_claims={"kubernetes.io/namespace": "training"},
        subject_jti="jti-1",
        model="llama-7b",
        action="fine-tune",
        tier="elevated",
        backend="vault",
        rule="trainer",
        policy_digest="sha256:00",
        audience=None,
        reason="nightly",
        lineage={"datasets": [{"uri": "s3://datasets/approved/a"}]},
        approval_id="a_1",
        issued_at=NOW - dt.timedelta(seconds=60),
        expires_at=NOW + dt.timedelta(seconds=expires_in),
        status=status,
        credential_ref="accessor-1",
        revoked_at=None,
        revoked_by=None,
        revoke_reason=None,
        backend_revocation=None,
    )
    values.update(fields)
    return GrantRow(**values)


def test_an_active_row_past_its_expiry_reads_expired() -> None:
    assert Grant.from_row(row(expires_in=1), NOW).status is GrantStatus.ACTIVE
    assert Grant.from_row(row(expires_in=0), NOW).status is GrantStatus.EXPIRED
    assert Grant.from_row(row(expires_in=-5), NOW).status is GrantStatus.EXPIRED


@pytest.mark.parametrize("status", ["revoked", "failed", "issuing", "expired"])
def test_other_statuses_are_kept_whatever_the_time(status: str) -> None:
    assert Grant.from_row(row(status, expires_in=-5), NOW).status is GrantStatus(status)


def test_unknown_statuses_are_refused() -> None:
    with pytest.raises(ValueError, match="'paused'"):
        Grant.from_row(row("paused"), NOW)


def test_the_grant_is_a_copy_of_its_row() -> None:
    source = row(revoked_at=NOW, revoked_by="sso:root", revoke_reason="leak", status="revoked")
    grant = Grant.from_row(source, NOW)
    source.identity_claims["kubernetes.io/namespace"] = "changed"
    assert grant.identity_claims == {"kubernetes.io/namespace": "training"}
    assert (grant.revoked_by, grant.revoke_reason, grant.revoked_at) == ("sso:root", "leak", NOW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grant.status = GrantStatus.ACTIVE  # type: ignore[misc]


def test_the_public_form_has_every_field_with_times_as_iso_text() -> None:
    grant = Grant.from_row(row(), NOW)
    public = grant.to_public()
    assert set(public) == {f.name for f in dataclasses.fields(Grant)}
    assert public["status"] == "active" and type(public["status"]) is str
    assert public["issued_at"] == "2030-01-01T11:59:00+00:00"
    assert public["expires_at"] == "2030-01-01T12:15:00+00:00"
    assert public["revoked_at"] is None
    assert public["lineage"] == {"datasets": [{"uri": "s3://datasets/approved/a"}]}
    assert "credential_ref" not in public and "subject_jti" not in public
