"""Separation of duties by person, end to end: the cases issue 12 reproduced, on a dev broker
whose example policy also trusts two SSO issuers with keys made here (real ES256 tokens)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.approvals.test_flow import K8S, LINEAGE, TRAINER, bearer, releaser
from tests.conftest import exchange_form, person_token
from tests.grants.support import events

SSO = "https://sso.example.com"
SSO2 = "https://sso2.example.com"


@dataclass
class SSOIssuer:
    """A people issuer the policy trusts through a pinned JWKS holding this key's public half."""

    url: str
    key: ec.EllipticCurvePrivateKey

    def jwks(self) -> str:
        public = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]})

    def token(self, sub: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": sub,
            "aud": "model-broker-admin",
            "iat": now,
            "exp": now + 600,
            "groups": ["ml-safety-reviewers"],
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k1"})


@dataclass
class People:
    client: TestClient
    broker: Broker
    sso: SSOIssuer
    sso2: SSOIssuer

    def review(self, approval_id: str, token: str, verb: str = "approve") -> Any:
        return self.client.post(
            f"/v1/approvals/{approval_id}/{verb}",
            json={"reason": f"{verb}d after reading the request"},
            headers=bearer(token),
        )

    def dev_person(self, sub: str) -> str:
        return person_token(self.broker, "approver", sub=sub)


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, f"the example policy no longer contains {old!r}"
    return text.replace(old, new, 1)


@pytest.fixture
def people(tmp_path: Path) -> Iterator[People]:
    """The example policy, with sso's keys pinned, a second SSO issuer (sso2) and alice's
    identity there: ``{issuer: sso2, subject: alice}``."""
    sso = SSOIssuer(SSO, ec.generate_private_key(ec.SECP256R1()))
    sso2 = SSOIssuer(SSO2, ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "sso.json").write_text(sso.jwks())
    (tmp_path / "sso2.json").write_text(sso2.jwks())
    text = EXAMPLE_POLICY.read_text()
    text = _edit(text, "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/")
    sso_block = f"    issuer: {SSO}\n    audiences: [model-broker-admin]\n    roles_claim: groups\n"
    text = _edit(
        text,
        sso_block,
        f"{sso_block}    jwks_file: sso.json\n"
        f"  - name: sso2\n    kind: people\n    issuer: {SSO2}\n"
        "    audiences: [model-broker-admin]\n    roles_claim: groups\n"
        "    jwks_file: sso2.json\n",
    )
    last = "    - {issuer: dev, claim: actor, value: alice}"
    text = _edit(text, last, f"{last}\n    - {{issuer: sso2, subject: alice}}")
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "data", policy=policy))
    try:
        with TestClient(create_app(broker=broker)) as client:
            yield People(client, broker, sso, sso2)
    finally:
        broker.close()


def two_approval_request(p: People, reason: str = "filter update") -> str:
    """A request that needs two approvals: edit-safety-filter (privileged, no rollback gate)."""
    form = exchange_form(releaser(p.broker), action="edit-safety-filter", reason=reason)
    resp = p.client.post("/v1/token", data=form)
    assert resp.status_code == 403 and "0 of 2" in resp.json()["error_description"], resp.text
    return str(resp.json()["approval_id"])


def test_one_person_through_two_sso_issuers_is_one_approval(people: People) -> None:
    """The issue's case: alice via sso, then via sso2, was approved with 2 approvals."""
    approval_id = two_approval_request(people)
    first = people.review(approval_id, people.sso.token("alice@example.com"))
    assert first.status_code == 200 and first.json()["approvals"] == 1

    second = people.review(approval_id, people.sso2.token("alice"))
    assert second.status_code == 409, second.text
    assert second.json()["error_description"] == (
        "alice has already reviewed this request (as 'alice@example.com' of sso); each person "
        "counts once, whichever identity they use"
    )
    view = people.broker.approvals.get(approval_id)
    assert (view["status"], view["approvals"], len(view["reviews"])) == ("pending", 1, 1)
    [reviewed] = [e for e in events(people.broker, "approval.reviewed")]
    assert reviewed["reviewer"] == {
        "issuer": "sso",
        "subject": "alice@example.com",
        "people": ["alice"],
    }
    exchange = people.client.post(
        "/v1/token",
        data=exchange_form(
            releaser(people.broker),
            action="edit-safety-filter",
            reason="filter update",
            approval_id=approval_id,
        ),
    )
    assert exchange.status_code == 403 and "access_token" not in exchange.text

    # A second person completes it.
    done = people.review(approval_id, people.dev_person("bob@example.com"))
    assert done.json()["status"] == "approved" and done.json()["approvals"] == 2


def test_the_example_policys_alice_counts_once_via_sso_and_dev_people(people: People) -> None:
    approval_id = two_approval_request(people)
    assert people.review(approval_id, people.sso.token("alice@example.com")).status_code == 200
    again = people.review(approval_id, people.dev_person("alice@example.com"))
    assert again.status_code == 409 and "each person counts once" in again.text
    assert people.broker.approvals.get(approval_id)["approvals"] == 1


def test_one_identity_in_another_case_is_the_same_reviewer(people: People) -> None:
    approval_id = two_approval_request(people)
    assert people.review(approval_id, people.sso.token("Alice@Example.com")).status_code == 200
    again = people.review(approval_id, people.sso.token("alice@example.com"))
    assert again.status_code == 409 and "each person counts once" in again.text
    assert people.review(approval_id, people.sso.token("bob@example.com")).json()["approvals"] == 2
    # Nobody in `people`: the same issuer and subject, ignoring case, is still one reviewer.
    other = two_approval_request(people, "another filter update")
    assert people.review(other, people.sso.token("carol@example.com")).status_code == 200
    twice = people.review(other, people.sso.token("CAROL@example.com"))
    assert twice.status_code == 409 and "'CAROL@example.com' has already reviewed" in twice.text


def workload_of(p: People, actor: str) -> str:
    """A request by a training job that ``actor`` triggered (the dev issuer's ``actor``)."""
    assert p.broker.dev_issuer is not None
    token = p.broker.dev_issuer.mint(sub=TRAINER, claims={**K8S, "actor": actor})
    resp = p.client.post(
        "/v1/token", data=exchange_form(token, action="fine-tune", lineage=LINEAGE)
    )
    assert resp.status_code == 403, resp.text
    return str(resp.json()["approval_id"])


@pytest.mark.parametrize("actor", ["alice", "Alice", "ALICE"])
def test_alice_cannot_approve_a_job_she_triggered_in_any_case(people: People, actor: str) -> None:
    """The issue's case: requester ``actor: Alice``, people ``value: alice``."""
    approval_id = workload_of(people, actor)
    for token in (
        people.sso.token("alice@example.com"),
        people.sso.token("Alice@example.com"),
        people.sso2.token("alice"),
        people.dev_person("alice@example.com"),
        people.dev_person("ALICE@EXAMPLE.COM"),
    ):
        resp = people.review(approval_id, token)
        assert resp.status_code == 403, resp.text
        assert resp.json()["error_description"] == (
            "the requester cannot review their own request (alice, through another identity)"
        )
    view = people.broker.approvals.get(approval_id)
    assert (view["status"], view["reviews"], view["requester"]["people"]) == (
        "pending",
        [],
        ["alice"],
    )
    # Someone else may.
    assert people.review(approval_id, people.sso.token("bob@example.com")).status_code == 200
