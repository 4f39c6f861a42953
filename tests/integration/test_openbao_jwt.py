"""A real relying party: OpenBao's JWT auth, pointed at a live broker's OIDC discovery URL.

What OpenBao does with broker JWTs, and with the broker's key rotation, is described in
docs/relying-parties.md; these tests are the evidence for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import hvac
import jwt
import pytest
from hvac.exceptions import InvalidRequest

from broker.runtime import Broker
from tests.conftest import EVAL_SUB, LiveServer, eval_token, exchange_form, person_token

pytestmark = pytest.mark.integration

POLICY = "llama-7b-evaluate"
POLICY_HCL = 'path "secret/data/models/llama-7b/*" { capabilities = ["read"] }'
BAD_SIGNATURE = "error verifying token signature"


@dataclass
class RelyingParty:
    """One JWT auth mount of the session's OpenBao, trusting one live broker."""

    admin: hvac.Client
    mount: str
    issuer: str

    def configure(self) -> None:
        """Write the mount's config. OpenBao drops its cached key set whenever this is written."""
        self.admin.auth.jwt.configure(
            oidc_discovery_url=self.issuer,
            # NOTE: with OIDC discovery OpenBao checks `iss` only against bound_issuer.
            bound_issuer=self.issuer,
            jwt_supported_algs=["ES256"],
            path=self.mount,
        )

    def add_role(self, name: str, audience: str, claims: dict[str, str]) -> None:
        self.admin.auth.jwt.create_role(
            name,
            role_type="jwt",
            user_claim="sub",
            allowed_redirect_uris=[],
            bound_audiences=[audience],
            bound_claims=claims,
            claim_mappings={"model": "model", "action": "action", "tier": "tier", "jti": "grant"},
            token_policies=[POLICY],
            # The OpenBao token must not outlive the broker JWT by much: evaluate's max_ttl is 1h.
            token_ttl="15m",
            token_explicit_max_ttl="1h",
            path=self.mount,
        )

    def login(self, role: str, token: str) -> dict[str, Any]:
        """Log in as a workload would: no OpenBao token of its own, only the broker JWT."""
        workload = hvac.Client(url=self.admin.url, session=self.admin.session)
        response: dict[str, Any] = workload.auth.jwt.jwt_login(
            role, token, use_token=False, path=self.mount
        )
        auth: dict[str, Any] = response["auth"]
        return auth

    def refusal(self, role: str, token: str) -> str:
        """The error OpenBao gives for a login that must fail."""
        with pytest.raises(InvalidRequest) as refused:
            self.login(role, token)
        return str(refused.value)


@pytest.fixture
def relying_party(
    openbao: hvac.Client, live_broker: tuple[LiveServer, Broker]
) -> Iterator[RelyingParty]:
    server, broker = live_broker
    assert broker.issuer_url == server.url
    openbao.sys.create_or_update_policy(POLICY, POLICY_HCL)
    mount = f"broker-{secrets.token_hex(4)}"  # one mount per test: no state shared between tests
    openbao.sys.enable_auth_method("jwt", path=mount)
    try:
        rp = RelyingParty(admin=openbao, mount=mount, issuer=broker.issuer_url)
        rp.configure()
        rp.add_role(
            "llama-7b-evaluate",
            "model:llama-7b",
            {"model": "llama-7b", "action": "evaluate", "tier": "low"},
        )
        yield rp
    finally:
        openbao.sys.disable_auth_method(mount)


def broker_jwt(server: LiveServer, broker: Broker) -> str:
    """A broker JWT for llama-7b/evaluate, exchanged over HTTP like a workload does."""
    resp = httpx.post(f"{server.url}/v1/token", data=exchange_form(eval_token(broker)))
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


def rotate(server: LiveServer, broker: Broker) -> dict[str, str | None]:
    headers = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
    resp = httpx.post(f"{server.url}/v1/keys/rotate", headers=headers)
    assert resp.status_code == 200, resp.text
    rotated: dict[str, str | None] = resp.json()
    return rotated


def published_kids(server: LiveServer) -> list[str]:
    return [k["kid"] for k in httpx.get(f"{server.url}/.well-known/jwks.json").json()["keys"]]


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def test_openbao_logs_in_a_broker_jwt_with_its_claims(
    relying_party: RelyingParty, openbao: hvac.Client, live_broker: tuple[LiveServer, Broker]
) -> None:
    token = broker_jwt(*live_broker)
    grant = jwt.decode(token, options={"verify_signature": False})["jti"]

    auth = relying_party.login("llama-7b-evaluate", token)

    assert auth["policies"] == ["default", POLICY]
    assert auth["metadata"] == {
        "role": "llama-7b-evaluate",
        "model": "llama-7b",
        "action": "evaluate",
        "tier": "low",
        "grant": grant,
    }
    assert 0 < auth["lease_duration"] <= 3600
    entity = openbao.secrets.identity.read_entity(auth["entity_id"])["data"]
    assert [(a["name"], a["mount_path"]) for a in entity["aliases"]] == [
        (EVAL_SUB, f"auth/{relying_party.mount}/")
    ]


def test_openbao_refuses_other_actions_models_and_issuers(
    relying_party: RelyingParty, live_broker: tuple[LiveServer, Broker]
) -> None:
    server, broker = live_broker
    token = broker_jwt(server, broker)
    # A role for the same model and audience but another action: only bound_claims differ.
    relying_party.add_role("llama-7b-fine-tune", "model:llama-7b", {"action": "fine-tune"})
    relying_party.add_role("mistral-7b-evaluate", "model:mistral-7b", {"model": "mistral-7b"})

    assert relying_party.login("llama-7b-evaluate", token)["policies"] == ["default", POLICY]
    assert 'claim "action" does not match' in relying_party.refusal("llama-7b-fine-tune", token)
    assert "invalid audience (aud) claim" in relying_party.refusal("mistral-7b-evaluate", token)
    # The workload's own identity token is not a broker JWT: another issuer, another key.
    assert BAD_SIGNATURE in relying_party.refusal("llama-7b-evaluate", eval_token(broker))


def test_rotated_out_key_is_refused_once_openbao_meets_the_new_key(
    relying_party: RelyingParty, live_broker: tuple[LiveServer, Broker]
) -> None:
    server, broker = live_broker
    role = "llama-7b-evaluate"
    first = broker_jwt(server, broker)
    relying_party.login(role, first)  # OpenBao fetches the JWKS: {first key}

    rotate(server, broker)
    second = broker_jwt(server, broker)
    relying_party.login(role, second)  # unknown kid: OpenBao re-fetches {second, first}
    relying_party.login(role, first)  # the overlap: first is still published as previous

    assert rotate(server, broker)["retired_kid"] == kid(first)
    assert kid(first) not in published_kids(server)
    # NOTE: OpenBao re-fetches the JWKS only for a token its cached keys cannot verify, so the
    # retired key it still holds keeps verifying. If this starts failing, OpenBao refreshes on
    # its own now: update docs/relying-parties.md.
    relying_party.login(role, first)

    third = broker_jwt(server, broker)
    assert kid(third) == published_kids(server)[0]
    relying_party.login(role, third)  # unknown kid: OpenBao re-fetches {third, second}
    assert BAD_SIGNATURE in relying_party.refusal(role, first)
    relying_party.login(role, second)


def test_rotated_out_key_is_refused_once_openbao_config_is_rewritten(
    relying_party: RelyingParty, live_broker: tuple[LiveServer, Broker]
) -> None:
    server, broker = live_broker
    role = "llama-7b-evaluate"
    first = broker_jwt(server, broker)
    relying_party.login(role, first)  # OpenBao fetches the JWKS: {first key}
    rotate(server, broker)
    rotate(server, broker)
    assert kid(first) not in published_kids(server)
    relying_party.login(role, first)  # still cached, as above

    relying_party.configure()  # same settings, written again: OpenBao drops its key set

    assert BAD_SIGNATURE in relying_party.refusal(role, first)
    fresh = broker_jwt(server, broker)
    assert kid(fresh) == published_kids(server)[0]
    assert relying_party.login(role, fresh)["metadata"]["model"] == "llama-7b"
