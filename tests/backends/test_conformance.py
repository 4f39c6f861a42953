"""The jwt backend against the shared conformance suite, and its own specifics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from broker.backends.base import Backend, Credential
from broker.backends.jwt import JwtBackend
from broker.backends.keys import KeyRing
from tests.backends.conformance import BackendConformance, NewGrant, Works, make_grant

ISSUER = "http://127.0.0.1:9"


class TestJwtConformance(BackendConformance):
    @pytest.fixture
    def keys(self, tmp_path: Path) -> KeyRing:
        return KeyRing(tmp_path / "keys")

    @pytest.fixture
    def backend(self, keys: KeyRing) -> Iterator[Backend]:
        yield JwtBackend(keys, ISSUER)

    @pytest.fixture
    def new_grant(self) -> NewGrant:
        return make_grant

    @pytest.fixture
    def credential_works(self, keys: KeyRing) -> Works:
        """A relying party's check: the signature verifies with the published keys."""

        def works(cred: Credential) -> bool:
            kid = jwt.get_unverified_header(cred.access_token)["kid"]
            key = keys.public_key(kid)
            if key is None:
                return False
            jwt.decode(cred.access_token, key, algorithms=["ES256"], options={"verify_aud": False})
            return True

        return works


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
