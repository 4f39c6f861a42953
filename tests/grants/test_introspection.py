"""RFC 7662 introspection of broker JWTs: active exactly while the token is a broker JWT of ours
whose grant is active for the same model and action; anything else is the bare inactive
answer, which says nothing about why."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.backends.jwt import JwtBackend
from broker.backends.keys import ALGORITHM
from broker.grants.introspection import introspect
from broker.grants.model import Grant
from broker.grants.service import ExchangeRequest
from broker.identity.verifier import MAX_TOKEN_BYTES
from broker.runtime import Broker
from tests.backends.conformance import make_grant
from tests.conftest import eval_token
from tests.grants.support import admin, store_grant

INACTIVE = {"active": False}


def ask(broker: Broker, token: str) -> dict[str, Any]:
    return introspect(token, keys=broker.keys, issuer_url=broker.issuer_url, grants=broker.grants)


def issued(broker: Broker) -> tuple[Grant, str]:
    """A real exchange's grant and broker JWT."""
    result = broker.grants.exchange(
        ExchangeRequest(
            subject_token=eval_token(broker),
            model="llama-7b",
            action="evaluate",
            token_type="urn:ietf:params:oauth:token-type:jwt",
        )
    )
    return result.grant, result.credential.access_token


def signed(broker: Broker, claims: dict[str, Any], **header: Any) -> str:
    key = broker.keys.current
    return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, **header})


def test_an_active_grant_is_reported_with_its_scope(broker: Broker) -> None:
    grant, token = issued(broker)
    answer = ask(broker, token)
    assert answer["active"] is True
    assert (answer["grant_id"], answer["jti"]) == (grant.id, grant.id)
    assert (answer["model"], answer["action"], answer["scope"], answer["tier"]) == (
        "llama-7b",
        "evaluate",
        "evaluate",
        "low",
    )
    assert answer["sub"] == grant.subject and answer["iss"] == broker.issuer_url
    assert answer["aud"] == "model:llama-7b" and answer["token_type"] == "Bearer"
    assert answer["exp"] == int(grant.expires_at.timestamp())


def test_revoked_and_expired_grants_are_inactive(broker: Broker) -> None:
    grant, token = issued(broker)
    broker.grants.revoke(grant.id, admin(broker), "done")
    assert ask(broker, token) == INACTIVE

    _, later = issued(broker)
    now = broker.grants.clock()
    broker.grants.clock = lambda: now + dt.timedelta(hours=2)  # past the grant, not the JWT's exp
    assert ask(broker, later) == INACTIVE


def test_a_token_of_ours_for_no_grant_is_inactive(broker: Broker) -> None:
    backend = JwtBackend(broker.keys, broker.issuer_url)
    assert ask(broker, backend.issue(make_grant()).access_token) == INACTIVE


Change = Callable[[Grant], Grant]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda g: dataclasses.replace(g, model="mistral-7b"), id="other-model"),
        pytest.param(lambda g: dataclasses.replace(g, action="fine-tune"), id="other-action"),
    ],
)
def test_a_token_whose_scope_differs_from_its_grant_is_inactive(
    broker: Broker, change: Change
) -> None:
    grant = store_grant(broker, make_grant(action="evaluate", tier="low"))
    backend = JwtBackend(broker.keys, broker.issuer_url)
    assert ask(broker, backend.issue(grant).access_token)["active"] is True
    assert ask(broker, backend.issue(change(grant)).access_token) == INACTIVE


def test_a_token_of_another_issuer_is_inactive(broker: Broker) -> None:
    grant = store_grant(broker, make_grant())
    other = JwtBackend(broker.keys, "https://other-broker.example.com")
    assert ask(broker, other.issue(grant).access_token) == INACTIVE


def test_a_token_missing_a_required_claim_is_inactive(broker: Broker) -> None:
    grant = store_grant(broker, make_grant())
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = {"iss": broker.issuer_url, "sub": grant.subject, "iat": now, "exp": now + 60}
    claims |= {"jti": grant.id, "model": grant.model, "action": grant.action}
    assert ask(broker, signed(broker, claims))["active"] is True
    for name in ("exp", "iat", "jti", "sub", "iss"):
        assert ask(broker, signed(broker, {k: v for k, v in claims.items() if k != name})) == (
            INACTIVE
        ), name


def test_forgeries_and_garbage_are_inactive(broker: Broker) -> None:
    grant = store_grant(broker, make_grant())
    good = JwtBackend(broker.keys, broker.issuer_url).issue(grant).access_token
    claims = jwt.decode(good, options={"verify_signature": False})
    stranger = ec.generate_private_key(ec.SECP256R1())
    kid = broker.keys.current.kid
    forged = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": kid})
    unknown_kid = signed(broker, claims, kid="not-a-key-of-ours")
    no_kid = jwt.encode(claims, broker.keys.current.private, algorithm="ES256")
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    for token in (forged, unknown_kid, no_kid, unsigned, "not-a-jwt", "", good + "x"):
        assert ask(broker, token) == INACTIVE
    assert ask(broker, good)["active"] is True


def test_oversized_tokens_are_inactive_even_when_otherwise_valid(broker: Broker) -> None:
    grant = store_grant(broker, make_grant())
    good = JwtBackend(broker.keys, broker.issuer_url).issue(grant).access_token
    claims = jwt.decode(good, options={"verify_signature": False})
    padded = signed(broker, {**claims, "pad": "x" * MAX_TOKEN_BYTES})
    assert len(padded) > MAX_TOKEN_BYTES
    assert ask(broker, padded) == INACTIVE
    assert ask(broker, good)["active"] is True
