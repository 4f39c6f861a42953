"""Scoped roles (issue 17): a role held through ``{group, models}`` covers those models only,
on every admin, approver and auditor route: in scope allowed, out of scope 403 or not listed;
a scoped admin's bulk revocation never reaches another model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.api.test_access import ACCESS
from tests.approvals.test_flow import LINEAGE, trainer
from tests.conftest import eval_token, exchange_form, person_token
from tests.vendor import SCOPED_ROLES, VENDOR_SUB, vendor_policy

VENDOR = "vera@vendor.example"


def headers(broker: Broker, group: str, sub: str = VENDOR) -> dict[str, str]:
    return {"Authorization": f"Bearer {person_token(broker, group, sub=sub)}"}


@dataclass
class World:
    client: TestClient
    broker: Broker
    vendor_grant: str
    other_grant: str
    vendor_request: str
    other_request: str

    def as_(self, group: str, sub: str = VENDOR) -> dict[str, str]:
        return headers(self.broker, group, sub)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    policy = vendor_policy(tmp_path, roles=SCOPED_ROLES)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    assert broker.dev_issuer is not None
    with TestClient(create_app(broker=broker)) as client:
        vendor = broker.dev_issuer.mint(sub=VENDOR_SUB)
        issued = client.post("/v1/token", data=exchange_form(vendor, model="vendor-llm"))
        other = client.post("/v1/token", data=exchange_form(eval_token(broker)))
        asked = client.post(
            "/v1/token",
            data=exchange_form(
                broker.dev_issuer.mint(sub=VENDOR_SUB), model="vendor-llm", action="fine-tune"
            ),
        )
        other_asked = client.post(
            "/v1/token", data=exchange_form(trainer(broker), action="fine-tune", lineage=LINEAGE)
        )
        assert issued.status_code == other.status_code == 200, (issued.text, other.text)
        assert asked.status_code == other_asked.status_code == 403
        yield World(
            client,
            broker,
            issued.json()["grant_id"],
            other.json()["grant_id"],
            asked.json()["approval_id"],
            other_asked.json()["approval_id"],
        )


def _status(world: World, grant_id: str) -> str:
    return str(world.broker.grants.get(grant_id).status)


# --- every person route says how it is scoped ---------------------------------------------------

SCOPED: dict[str, str] = {
    "GET /v1/grants": "listed: only the scope's models; ?model= outside it is 403",
    "GET /v1/grants/{grant_id}": "403 for a grant of another model",
    "POST /v1/grants/{grant_id}/revoke": "403 for another model, and for the owners' rollback path",
    "POST /v1/revocations": "reaches the scope's models only; spares the owners' rollback path",
    "POST /v1/keys/rotate": "403: it concerns every model",
    "GET /v1/audit/checkpoint": "allowed: a tree head names no entry",
    "GET /v1/audit/key": "allowed: the public key",
    "GET /v1/audit/entries": "403: entries of every model; a scoped export instead",
    "GET /v1/audit/proof/inclusion": "allowed: hashes only",
    "GET /v1/audit/proof/consistency": "allowed: hashes only",
    "GET /v1/audit/export": "only globs the scope covers",
    "GET /v1/approvals": "listed: only the scope's models; ?model= outside it is 403",
    "GET /v1/approvals/{approval_id}": "403 for a request of another model",
    "POST /v1/approvals/{approval_id}/approve": "403 for another model, and the rollback path",
    "POST /v1/approvals/{approval_id}/deny": "403 for another model, and the rollback path",
    "GET /v1/lineage/{model}": "403 for another model",
    "GET /v1/rollback-tests": "listed: only the scope's models; ?model= outside it is 403",
    "POST /v1/introspect": "not an admin route: a relying party asks about a token it holds",
}


def test_every_route_a_person_calls_says_how_it_is_scoped() -> None:
    persons = {r for r, entry in ACCESS.items() if entry.rule.bearer in ("person", "any")}
    assert persons == set(SCOPED)


# --- grants --------------------------------------------------------------------------------------


def test_grants_list_and_show_by_scope(world: World) -> None:
    c, vendor = world.client, world.as_("vendor-ops")
    listed = c.get("/v1/grants", headers=vendor).json()["grants"]
    assert [g["id"] for g in listed] == [world.vendor_grant]
    assert c.get("/v1/grants", params={"model": "vendor-llm"}, headers=vendor).status_code == 200
    refused = c.get("/v1/grants", params={"model": "llama-7b"}, headers=vendor)
    assert refused.status_code == 403
    assert "holds admin for models ['vendor-*'] only; 'llama-7b' is not among them" in refused.text
    assert c.get(f"/v1/grants/{world.vendor_grant}", headers=vendor).status_code == 200
    assert c.get(f"/v1/grants/{world.other_grant}", headers=vendor).status_code == 403
    # The vendor's auditors read the same way; the customer's admins read everything.
    auditor = world.as_("vendor-audit")
    assert [g["id"] for g in c.get("/v1/grants", headers=auditor).json()["grants"]] == [
        world.vendor_grant
    ]
    everyone = c.get("/v1/grants", headers=world.as_("admin", "ann@acme.example")).json()
    assert {g["id"] for g in everyone["grants"]} == {world.vendor_grant, world.other_grant}


def test_revoking_by_scope(world: World) -> None:
    c, vendor = world.client, world.as_("vendor-ops")
    out = c.post(f"/v1/grants/{world.other_grant}/revoke", json={"reason": "x"}, headers=vendor)
    assert out.status_code == 403 and _status(world, world.other_grant) == "active"
    inside = c.post(f"/v1/grants/{world.vendor_grant}/revoke", json={"reason": "x"}, headers=vendor)
    assert inside.status_code == 200 and _status(world, world.vendor_grant) == "revoked"


def test_a_scoped_bulk_revocation_never_reaches_another_model(world: World) -> None:
    c, vendor = world.client, world.as_("vendor-ops")
    refused = c.post("/v1/revocations", json={"model": "llama-7b", "reason": "x"}, headers=vendor)
    assert refused.status_code == 403
    # By issuer: both grants are the dev issuer's; only the vendor's model is reached.
    done = c.post("/v1/revocations", json={"issuer": "dev", "reason": "x"}, headers=vendor)
    assert done.status_code == 200 and done.json()["revoked"] == [world.vendor_grant]
    assert _status(world, world.other_grant) == "active"
    # By the other grant's subject: nothing of the vendor's scope.
    other_sub = world.broker.grants.get(world.other_grant).subject
    by_sub = c.post("/v1/revocations", json={"subject": other_sub, "reason": "x"}, headers=vendor)
    assert by_sub.json()["revoked"] == [] and _status(world, world.other_grant) == "active"


def test_key_rotation_needs_an_unscoped_admin(world: World) -> None:
    refused = world.client.post("/v1/keys/rotate", headers=world.as_("vendor-ops"))
    assert refused.status_code == 403 and "needs the role for every model" in refused.text


# --- approvals, lineage, rollback tests ----------------------------------------------------------


def test_approvals_by_scope(world: World) -> None:
    c, vendor = world.client, world.as_("vendor-reviewers")
    listed = c.get("/v1/approvals", headers=vendor).json()["approvals"]
    assert [a["id"] for a in listed] == [world.vendor_request]
    assert c.get("/v1/approvals", params={"model": "llama-7b"}, headers=vendor).status_code == 403
    assert c.get(f"/v1/approvals/{world.vendor_request}", headers=vendor).status_code == 200
    assert c.get(f"/v1/approvals/{world.other_request}", headers=vendor).status_code == 403
    for verb in ("approve", "deny"):
        out = c.post(
            f"/v1/approvals/{world.other_request}/{verb}", json={"reason": "x"}, headers=vendor
        )
        assert out.status_code == 403, out.text
    assert world.broker.approvals.get(world.other_request)["status"] == "pending"
    ok = c.post(
        f"/v1/approvals/{world.vendor_request}/approve", json={"reason": "ok"}, headers=vendor
    )
    assert ok.status_code == 200 and ok.json()["status"] == "approved"


def test_lineage_and_rollback_tests_by_scope(world: World) -> None:
    c, vendor = world.client, world.as_("vendor-audit")
    assert c.get("/v1/lineage/vendor-llm", headers=vendor).status_code == 200
    assert c.get("/v1/lineage/llama-7b", headers=vendor).status_code == 403
    assert c.get("/v1/rollback-tests", headers=vendor).status_code == 200
    assert (
        c.get("/v1/rollback-tests", params={"model": "vendor-llm"}, headers=vendor).status_code
        == 200
    )
    out = c.get("/v1/rollback-tests", params={"model": "llama-7b"}, headers=vendor)
    assert out.status_code == 403


# --- the audit log ---------------------------------------------------------------------------


def test_a_scoped_auditor_reads_scoped_exports_only(world: World) -> None:
    c, vendor = world.client, world.as_("vendor-audit")
    entries = c.get("/v1/audit/entries", params={"start": 0, "end": 1}, headers=vendor)
    assert entries.status_code == 403 and "GET /v1/audit/export" in entries.text
    for allowed in ("vendor-*", "vendor-llm"):
        got = c.get("/v1/audit/export", params={"model": allowed}, headers=vendor)
        assert got.status_code == 200, got.text
    for beyond in ("*", "llama-7b", "vendor-**", "vendor-l*"):
        got = c.get("/v1/audit/export", params={"model": ["vendor-*", beyond]}, headers=vendor)
        assert got.status_code == 403, beyond
    # Tree heads, the key and proofs (hashes) are what a monitor needs, and name no entry.
    assert c.get("/v1/audit/checkpoint", headers=vendor).status_code == 200
    assert c.get("/v1/audit/key", headers=vendor).status_code == 200
    customer = world.as_("auditor", "sam@acme.example")
    assert (
        c.get("/v1/audit/entries", params={"start": 0, "end": 1}, headers=customer).status_code
        == 200
    )
    assert c.get("/v1/audit/export", params={"model": "*"}, headers=customer).status_code == 200
