"""The owners' rollback path (issue 17): an action marked ``rollback: true`` is obtained by the
owners' own workflow through the controls they configured (their rule; the approvals the tier
asks for, by approvers for every model), and a vendor-scoped admin or approver cannot block it:
not by revoking its grant, not by bulk-revoking the model, not by denying (nor approving) its
request. The customer's own (unscoped) admins still can revoke it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.conftest import exchange_form, person_token
from tests.vendor import OWNER_SUB, SCOPED_ROLES, VENDOR_MODEL, VENDOR_SUB, vendor_policy

VENDOR = "vera@vendor.example"
CUSTOMER = "carol@acme.example"


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    policy = vendor_policy(tmp_path, roles=SCOPED_ROLES)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def as_(broker: Broker, group: str, sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {person_token(broker, group, sub=sub)}"}


def rollback(client: TestClient, broker: Broker, **extra: str) -> dict[str, object]:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=OWNER_SUB)
    data = exchange_form(token, model=VENDOR_MODEL, action="rollback-weights", **extra)
    resp = client.post("/v1/token", data=data)
    return {"status": resp.status_code, **resp.json()}


def test_the_owners_rollback_cannot_be_blocked_by_the_vendor(
    scene: tuple[TestClient, Broker],
) -> None:
    client, broker = scene
    vendor_admin = as_(broker, "vendor-ops", VENDOR)
    vendor_reviewer = as_(broker, "vendor-reviewers", VENDOR)

    asked = rollback(client, broker)
    assert (asked["status"], asked["error"]) == (403, "approval_required")
    request = str(asked["approval_id"])

    # The vendor's approvers (scoped to vendor-*) can neither deny nor approve it.
    for verb in ("deny", "approve"):
        out = client.post(
            f"/v1/approvals/{request}/{verb}", json={"reason": "no"}, headers=vendor_reviewer
        )
        assert out.status_code == 403, out.text
        assert "owners' rollback path" in out.json()["error_description"]
    assert broker.approvals.get(request)["status"] == "pending"
    # ... while they do review the vendor's ordinary requests of the same model.
    assert broker.dev_issuer is not None
    ordinary = client.post(
        "/v1/token",
        data=exchange_form(
            broker.dev_issuer.mint(sub=VENDOR_SUB), model=VENDOR_MODEL, action="fine-tune"
        ),
    ).json()["approval_id"]
    out = client.post(
        f"/v1/approvals/{ordinary}/deny", json={"reason": "not now"}, headers=vendor_reviewer
    )
    assert out.status_code == 200

    # The customer's approver approves as the tier says (one approval); the owners exchange.
    approved = client.post(
        f"/v1/approvals/{request}/approve",
        json={"reason": "roll back"},
        headers=as_(broker, "approver", CUSTOMER),
    )
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    got = rollback(client, broker, approval_id=request)
    assert got["status"] == 200, got
    grant = str(got["grant_id"])

    # The vendor's admin cannot revoke it, alone or in bulk; the vendor's own grants go.
    vendor_grant = client.post(
        "/v1/token",
        data=exchange_form(broker.dev_issuer.mint(sub=VENDOR_SUB), model=VENDOR_MODEL),
    ).json()["grant_id"]
    out = client.post(f"/v1/grants/{grant}/revoke", json={"reason": "x"}, headers=vendor_admin)
    assert out.status_code == 403 and "owners' rollback path" in out.text
    bulk = client.post(
        "/v1/revocations", json={"model": VENDOR_MODEL, "reason": "x"}, headers=vendor_admin
    ).json()
    assert bulk == {"revoked": [vendor_grant], "spared": [grant]}
    by_subject = client.post(
        "/v1/revocations", json={"subject": OWNER_SUB, "reason": "x"}, headers=vendor_admin
    ).json()
    assert by_subject == {"revoked": [], "spared": [grant]}
    assert str(broker.grants.get(grant).status) == "active"

    # The customer's admin (every model) can.
    out = client.post(
        f"/v1/grants/{grant}/revoke",
        json={"reason": "rolled back; done"},
        headers=as_(broker, "admin", CUSTOMER),
    )
    assert out.status_code == 200 and str(broker.grants.get(grant).status) == "revoked"
