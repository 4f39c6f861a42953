"""Scoped roles (issue 17): a role held through ``{group, models}`` covers those models only,
on every admin, approver and auditor route: in scope allowed, out of scope 403 or not listed;
a scoped admin's bulk revocation never reaches another model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.api.test_access import ACCESS
from tests.approvals.support import drill_token, report_test
from tests.approvals.test_flow import LINEAGE, trainer
from tests.conftest import eval_token, exchange_form, person_token
from tests.vendor import OWNER_SUB, SCOPED_ROLES, VENDOR_SUB, vendor_policy

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
        owner = broker.dev_issuer.mint(sub=OWNER_SUB)
        assert report_test(client, owner, model="vendor-llm").status_code == 201
        assert report_test(client, drill_token(broker)).status_code == 201
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


# --- every route a person calls, in scope and out of it -------------------------------------------


@dataclass(frozen=True)
class Call:
    """A request; ``{grant}``, ``{request}`` and ``{model}`` in its path, query and body are
    the world's vendor ones (in scope) or the customer's (out of scope)."""

    path: str
    query: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Case:
    group: str
    """The vendor's group that calls (holding the route's role for vendor-* only)."""
    inside: Call | None
    """Passes for the vendor (None: the route has nothing of the vendor's to act on)."""
    outside: Call | None
    """403 for the vendor, and passes for the customer (None: nothing to refuse)."""
    listed: str | None = None
    """For a list route, the key whose items' ids must be the vendor's only."""


ADMIN, APPROVER, AUDITOR = "vendor-ops", "vendor-reviewers", "vendor-audit"
REASON = {"reason": "scoped"}
GRANT = Call("/v1/grants/{grant}")
REQUEST = Call("/v1/approvals/{request}")

SCOPED: dict[str, Case] = {
    "GET /v1/grants": Case(
        AUDITOR,
        Call("/v1/grants", {"model": "{model}"}),
        Call("/v1/grants", {"model": "{model}"}),
        listed="grants",
    ),
    "GET /v1/grants/{grant_id}": Case(AUDITOR, GRANT, GRANT),
    "POST /v1/grants/{grant_id}/revoke": Case(
        ADMIN,
        Call("/v1/grants/{grant}/revoke", body=REASON),
        Call("/v1/grants/{grant}/revoke", body=REASON),
    ),
    "POST /v1/revocations": Case(
        ADMIN,
        Call("/v1/revocations", body={"model": "{model}", **REASON}),
        Call("/v1/revocations", body={"model": "{model}", **REASON}),
    ),
    # What concerns every model needs the role for every model.
    "POST /v1/keys/rotate": Case(ADMIN, None, Call("/v1/keys/rotate")),
    "GET /v1/audit/entries": Case(AUDITOR, None, Call("/v1/audit/entries", {"start": 0, "end": 1})),
    # Tree heads, the key and proofs are hashes: what a monitor needs, naming no entry.
    "GET /v1/audit/checkpoint": Case(AUDITOR, Call("/v1/audit/checkpoint"), None),
    "GET /v1/audit/key": Case(AUDITOR, Call("/v1/audit/key"), None),
    "GET /v1/audit/proof/inclusion": Case(
        AUDITOR, Call("/v1/audit/proof/inclusion", {"index": 0, "size": 1}), None
    ),
    "GET /v1/audit/proof/consistency": Case(
        AUDITOR, Call("/v1/audit/proof/consistency", {"from": 1, "to": 1}), None
    ),
    "GET /v1/audit/export": Case(
        AUDITOR,
        Call("/v1/audit/export", {"model": "{model}"}),
        Call("/v1/audit/export", {"model": "{model}"}),
    ),
    "GET /v1/approvals": Case(
        AUDITOR,
        Call("/v1/approvals", {"model": "{model}"}),
        Call("/v1/approvals", {"model": "{model}"}),
        listed="approvals",
    ),
    "GET /v1/approvals/{approval_id}": Case(AUDITOR, REQUEST, REQUEST),
    "POST /v1/approvals/{approval_id}/approve": Case(
        APPROVER,
        Call("/v1/approvals/{request}/approve", body=REASON),
        Call("/v1/approvals/{request}/approve", body=REASON),
    ),
    "POST /v1/approvals/{approval_id}/deny": Case(
        APPROVER,
        Call("/v1/approvals/{request}/deny", body=REASON),
        Call("/v1/approvals/{request}/deny", body=REASON),
    ),
    "GET /v1/lineage/{model}": Case(
        AUDITOR, Call("/v1/lineage/{model}"), Call("/v1/lineage/{model}")
    ),
    "GET /v1/rollback-tests": Case(
        AUDITOR,
        Call("/v1/rollback-tests", {"model": "{model}"}),
        Call("/v1/rollback-tests", {"model": "{model}"}),
        listed="rollback_tests",
    ),
    # Not an admin route: a relying party asks about a token it holds.
    "POST /v1/introspect": Case(AUDITOR, None, None),
}
CUSTOMER = {ADMIN: "admin", APPROVER: "approver", AUDITOR: "auditor"}


def test_every_route_a_person_calls_is_in_the_table() -> None:
    persons = {r for r, entry in ACCESS.items() if entry.rule.bearer in ("person", "any")}
    assert persons == set(SCOPED)


def _fill(value: Any, world: World, *, inside: bool) -> Any:
    names = {
        "{grant}": world.vendor_grant if inside else world.other_grant,
        "{request}": world.vendor_request if inside else world.other_request,
        "{model}": "vendor-llm" if inside else "llama-7b",
    }
    if isinstance(value, str):
        for name, filled in names.items():
            value = value.replace(name, filled)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, world, inside=inside) for k, v in value.items()}
    return value


def _send(world: World, route: str, call: Call, headers: dict[str, str], *, inside: bool) -> Any:
    method = route.split(" ", 1)[0]
    return world.client.request(
        method,
        _fill(call.path, world, inside=inside),
        params=_fill(call.query, world, inside=inside),
        json=_fill(call.body, world, inside=inside),
        headers=headers,
    )


@pytest.mark.parametrize("route", sorted(SCOPED))
def test_route_in_scope_allowed_out_of_scope_refused(route: str, world: World) -> None:
    case = SCOPED[route]
    vendor = world.as_(case.group)
    if case.outside is not None:
        refused = _send(world, route, case.outside, vendor, inside=False)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "insufficient_role"
        assert "for models ['vendor-*'] only" in refused.json()["error_description"]
        customer = world.as_(CUSTOMER[case.group], "ann@acme.example")
        allowed = _send(world, route, case.outside, customer, inside=False)
        assert allowed.status_code < 400, allowed.text
    if case.inside is not None:
        passed = _send(world, route, case.inside, vendor, inside=True)
        assert passed.status_code < 400, passed.text
    if case.listed is not None:
        listed = world.client.get(route.split(" ", 1)[1], headers=vendor).json()[case.listed]
        assert {item["model"] for item in listed} == {"vendor-llm"}


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


# --- approvals and the audit log ---------------------------------------------------------------


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
