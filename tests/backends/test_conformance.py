"""The shared conformance suite: every backend must pass it (jwt now; vault and aws later)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from broker.backends.base import Backend, BackendRegistry
from broker.backends.jwt import JwtBackend
from broker.backends.keys import KeyRing
from broker.errors import InvalidRequest
from broker.grants.model import Grant, GrantStatus

ISSUER = "http://127.0.0.1:9"


def make_grant(**overrides: object) -> Grant:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    fields: dict[str, object] = dict(
        id="g_conformance01",
        issuer="ci",
        issuer_url="https://ci.example",
        subject="repo:a/b",
        identity_claims={},
        model="llama-7b",
        action="evaluate",
        tier="low",
        backend="jwt",
        rule="r",
        policy_digest="sha256:00",
        audience=None,
        reason=None,
        lineage=None,
        approval_id=None,
        issued_at=now,
        expires_at=now + dt.timedelta(minutes=15),
        status=GrantStatus.ACTIVE,
    )
    fields.update(overrides)
    return Grant(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["jwt"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "jwt":
        yield JwtBackend(KeyRing(tmp_path / "keys"), ISSUER)


def test_issue_returns_a_credential_bound_to_the_grant(backend: Backend) -> None:
    grant = make_grant(backend=backend.name)
    cred = backend.issue(grant)
    assert cred.access_token
    assert cred.issued_token_type == backend.token_type
    assert cred.expires_at == grant.expires_at
    assert cred.credential_ref
    assert cred.access_token not in repr(cred)


def test_revoke_is_confirmed(backend: Backend) -> None:
    grant = make_grant(backend=backend.name)
    cred = backend.issue(grant)
    assert backend.revoke(grant, cred.credential_ref) is True


def test_registry_maps_token_types_and_refuses_disabled_ones(backend: Backend) -> None:
    reg = BackendRegistry({backend.name: backend})
    assert reg.for_token_type(backend.token_type) is backend
    with pytest.raises(InvalidRequest, match="not supported"):
        reg.for_token_type("urn:nope")
    others = {"jwt", "vault", "aws"} - {backend.name}
    with pytest.raises(InvalidRequest, match="not enabled"):
        reg.get(others.pop())


def test_jwt_claims_and_audience(tmp_path: Path) -> None:
    keys = KeyRing(tmp_path / "keys")
    backend = JwtBackend(keys, ISSUER)
    grant = make_grant(audience="vault-prod")
    token = backend.issue(grant).access_token
    header = jwt.get_unverified_header(token)
    assert header["kid"] == keys.current.kid and header["alg"] == "ES256"
    claims = jwt.decode(
        token, keys.public_key(header["kid"]), algorithms=["ES256"], audience="vault-prod"
    )
    assert claims["jti"] == grant.id and claims["iss"] == ISSUER
    assert claims["exp"] == int(grant.expires_at.timestamp())


def test_signing_key_persists_and_is_private(tmp_path: Path) -> None:
    first = KeyRing(tmp_path / "keys")
    second = KeyRing(tmp_path / "keys")
    assert first.current.kid == second.current.kid
    assert (tmp_path / "keys" / "jwt-current.pem").stat().st_mode & 0o077 == 0
