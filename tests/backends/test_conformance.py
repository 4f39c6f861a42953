"""The jwt backend against the shared conformance suite, and its own specifics."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from broker.backends.base import Backend, Credential
from broker.backends.jwt import JwtBackend
from broker.backends.keys import KeyRing
from broker.grants.introspection import introspect
from broker.grants.model import Grant
from broker.runtime import Broker
from broker.store.db import Store, sqlite_url
from tests.backends.conformance import BackendConformance, NewGrant, Revoke, Works, make_grant
from tests.conftest import person_token
from tests.grants.support import store_grant
from tests.keys.support import key_store

ISSUER = "http://127.0.0.1:9"


class TestJwtConformance(BackendConformance):
    """The jwt backend keeps no state of its own: a broker JWT stops working when its grant is
    no longer active, which is what introspection (asked by every relying party that needs
    prompt revocation) answers. So its credential_works is introspection, and its revocation
    is the broker's: the grant revoked, then the backend told."""

    @pytest.fixture
    def backend(self, broker: Broker) -> Backend:
        return broker.grants.backends.get("jwt")

    @pytest.fixture
    def new_grant(self, broker: Broker) -> NewGrant:
        return lambda: store_grant(broker, make_grant())

    @pytest.fixture
    def credential_works(self, broker: Broker) -> Works:
        def works(cred: Credential) -> bool:
            answer = introspect(
                cred.access_token,
                keys=broker.keys,
                issuer_url=broker.issuer_url,
                grants=broker.grants,
            )
            return answer["active"] is True

        return works

    @pytest.fixture
    def revoke(self, broker: Broker) -> Revoke:
        admin = broker.verifier.verify_person(person_token(broker, "admin", sub="root@example.com"))

        def revoke(grant: Grant, cred: Credential) -> bool:
            revoked = broker.grants.revoke(grant.id, admin, "conformance")
            return revoked.backend_revocation == "confirmed"

        return revoke


def test_jwt_claims_and_audience(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    store.migrate()
    keys = KeyRing(key_store(store))
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
    store.close()
