"""Scoped roles in the console (issues 16 and 17): a vendor's admin, approver or auditor (a role
held through ``{group, models: ["vendor-*"]}``) sees and acts on the vendor's models only, on
every console page, exactly as the API decides (broker.api.deps): in scope allowed, out of
scope a 403 page (while the customer's own role passes), and lists show the vendor's items only.

``SCOPED`` has a row for every route of ``PAGES`` (tests/console/test_access.py): a console
route missing from it fails ``test_every_console_route_is_in_the_scope_table``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.audit.scoped import verify_scoped
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.api.test_rollback_path import rollback
from tests.approvals.test_flow import LINEAGE, trainer
from tests.conftest import eval_token, exchange_form
from tests.console.support import sign_in
from tests.console.test_access import PAGES
from tests.vendor import SCOPED_ROLES, VENDOR_MODEL, VENDOR_SUB, vendor_policy

ADMIN, APPROVER, AUDITOR = "vendor-ops", "vendor-reviewers", "vendor-audit"
CUSTOMER = {ADMIN: "admin", APPROVER: "approver", AUDITOR: "auditor"}
SCOPE_REFUSAL = "for models ['vendor-*'] only"


@dataclass
class World:
    app: Any
    broker: Broker
    vendor_grant: str
    other_grant: str
    vendor_request: str
    other_request: str
    api: TestClient
    """The one client that runs the app's lifespan; browsers share it."""

    def browser(self, group: str, name: str = "vera@vendor.example") -> tuple[TestClient, str]:
        """A signed-in browser of ``name`` in ``group`` (a group or role name), and its CSRF."""
        client = TestClient(self.app, follow_redirects=False)
        return client, sign_in(client, name, group)

    def customer(self, group: str) -> tuple[TestClient, str]:
        return self.browser(CUSTOMER[group], "ann@acme.example")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    policy = vendor_policy(tmp_path, roles=SCOPED_ROLES)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    assert broker.dev_issuer is not None
    app = create_app(broker=broker)
    with TestClient(app) as api:
        vendor = api.post(
            "/v1/token",
            data=exchange_form(broker.dev_issuer.mint(sub=VENDOR_SUB), model=VENDOR_MODEL),
        )
        other = api.post("/v1/token", data=exchange_form(eval_token(broker)))
        asked = api.post(
            "/v1/token",
            data=exchange_form(
                broker.dev_issuer.mint(sub=VENDOR_SUB), model=VENDOR_MODEL, action="fine-tune"
            ),
        )
        other_asked = api.post(
            "/v1/token", data=exchange_form(trainer(broker), action="fine-tune", lineage=LINEAGE)
        )
        assert vendor.status_code == other.status_code == 200, (vendor.text, other.text)
        assert asked.status_code == other_asked.status_code == 403
        found = World(
            app,
            broker,
            vendor.json()["grant_id"],
            other.json()["grant_id"],
            asked.json()["approval_id"],
            other_asked.json()["approval_id"],
            api,
        )
        yield found


# --- every console route, in scope and out of it -------------------------------------------------


@dataclass(frozen=True)
class Call:
    """``{grant}``, ``{request}`` and ``{model}`` are the vendor's (in scope) or the customer's
    (out of scope); ``form`` is posted with the browser's CSRF token."""

    path: str
    query: dict[str, Any] = field(default_factory=dict)
    form: dict[str, Any] | None = None


@dataclass(frozen=True)
class Case:
    group: str
    """The vendor's group that asks (holding the page's role for vendor-* only)."""
    inside: Call | None
    """Passes for the vendor (None: nothing of the vendor's to act on)."""
    outside: Call | None
    """A 403 page for the vendor, and passes for the customer (None: nothing to refuse)."""
    listed: bool = False
    """A list page: the vendor's own items are linked, the customer's are not."""


REASON = {"reason": "scoped console"}
UNSCOPED = None
"""Sign-in, sign-out and static files: no role, so no scope."""

SCOPED: dict[str, Case | None] = {
    "GET /console/": UNSCOPED,
    "GET /console/signin": UNSCOPED,
    "GET /console/login/{issuer}": UNSCOPED,
    "GET /console/callback": UNSCOPED,
    "POST /console/dev/signin": UNSCOPED,
    "POST /console/signout": UNSCOPED,
    "MOUNT /console/static": UNSCOPED,
    "GET /console/approvals": Case(
        AUDITOR, Call("/console/approvals", {"status": ""}), None, listed=True
    ),
    "GET /console/approvals/{approval_id}": Case(
        AUDITOR, Call("/console/approvals/{request}"), Call("/console/approvals/{request}")
    ),
    "POST /console/approvals/{approval_id}/approve": Case(
        APPROVER,
        Call("/console/approvals/{request}/approve", form=REASON),
        Call("/console/approvals/{request}/approve", form=REASON),
    ),
    "POST /console/approvals/{approval_id}/deny": Case(
        APPROVER,
        Call("/console/approvals/{request}/deny", form=REASON),
        Call("/console/approvals/{request}/deny", form=REASON),
    ),
    "GET /console/grants": Case(
        AUDITOR,
        Call("/console/grants", {"model": "{model}"}),
        Call("/console/grants", {"model": "{model}"}),
        listed=True,
    ),
    "GET /console/grants/{grant_id}": Case(
        AUDITOR, Call("/console/grants/{grant}"), Call("/console/grants/{grant}")
    ),
    "POST /console/grants/{grant_id}/revoke": Case(
        ADMIN,
        Call("/console/grants/{grant}/revoke", form=REASON),
        Call("/console/grants/{grant}/revoke", form=REASON),
    ),
    "GET /console/revocations": Case(
        ADMIN,
        Call("/console/revocations", {"model": "{model}"}),
        Call("/console/revocations", {"model": "{model}"}),
    ),
    "POST /console/revocations": Case(
        ADMIN,
        Call("/console/revocations", form={"model": "{model}", **REASON}),
        Call("/console/revocations", form={"model": "{model}", **REASON}),
    ),
    "GET /console/lineage": Case(
        AUDITOR,
        Call("/console/lineage", {"model": "{model}"}),
        Call("/console/lineage", {"model": "{model}"}),
    ),
    "GET /console/audit": Case(AUDITOR, Call("/console/audit"), None),
    "GET /console/audit/export": Case(
        AUDITOR,
        Call("/console/audit/export", {"model": "{model}"}),
        Call("/console/audit/export", {"model": "{model}"}),
    ),
}


def test_every_console_route_is_in_the_scope_table() -> None:
    assert set(SCOPED) == set(PAGES)
    # Every page that needs a role has a scope case; only role-less routes are unscoped.
    assert {r for r, case in SCOPED.items() if case is None} == {
        r for r, page in PAGES.items() if not page.roles
    }


def _fill(value: Any, world: World, *, inside: bool) -> Any:
    names = {
        "{grant}": world.vendor_grant if inside else world.other_grant,
        "{request}": world.vendor_request if inside else world.other_request,
        "{model}": VENDOR_MODEL if inside else "llama-7b",
    }
    if isinstance(value, str):
        for name, filled in names.items():
            value = value.replace(name, filled)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, world, inside=inside) for k, v in value.items()}
    return value


def _send(client: TestClient, csrf: str, call: Call, world: World, *, inside: bool) -> Any:
    form = None if call.form is None else {**_fill(call.form, world, inside=inside), "csrf": csrf}
    return client.request(
        "POST" if form is not None else "GET",
        _fill(call.path, world, inside=inside),
        params=_fill(call.query, world, inside=inside),
        data=form,
    )


@pytest.mark.parametrize("route", sorted(r for r, case in SCOPED.items() if case is not None))
def test_page_in_scope_allowed_out_of_scope_refused(route: str, world: World) -> None:
    case = SCOPED[route]
    assert case is not None
    vendor, csrf = world.browser(case.group)
    if case.outside is not None:
        refused = _send(vendor, csrf, case.outside, world, inside=False)
        assert refused.status_code == 403, refused.text
        assert SCOPE_REFUSAL in html.unescape(refused.text)
        customer, customer_csrf = world.customer(case.group)
        allowed = _send(customer, customer_csrf, case.outside, world, inside=False)
        assert allowed.status_code < 400, allowed.text
    if case.inside is not None:
        passed = _send(vendor, csrf, case.inside, world, inside=True)
        assert passed.status_code < 400, passed.text
    if case.listed:
        page = vendor.get(route.split(" ", 1)[1], params={"status": ""}).text
        linked = set(re.findall(r'href="/console/(?:grants|approvals)/([^"/?]+)"', page))
        mine = {world.vendor_grant, world.vendor_request}
        theirs = {world.other_grant, world.other_request}
        assert linked & mine and not linked & theirs, linked


def test_pages_offer_only_the_vendors_models(world: World) -> None:
    vendor, _ = world.browser(ADMIN)
    for path in ("/console/grants", "/console/lineage"):
        page = vendor.get(path).text
        assert "vendor-llm" in page and "vendor-tts" in page and "llama-7b" not in page, path
        assert "Your roles are scoped: admin for models [&#39;vendor-*&#39;] only" in page
    # The bulk revocation is offered for the vendor's model only.
    assert (
        "/console/revocations?model=vendor-llm"
        in vendor.get("/console/grants", params={"model": VENDOR_MODEL}).text
    )
    customer, _ = world.customer(ADMIN)
    page = customer.get("/console/grants").text
    assert "llama-7b" in page and "Your roles are scoped" not in page


# --- the owners' rollback path -------------------------------------------------------------------


def _owners_rollback_grant(world: World) -> tuple[str, str]:
    """The owners' rollback request, approved by the customer's approver, and its grant."""
    asked = rollback(world.api, world.broker)
    request = str(asked["approval_id"])
    approver, csrf = world.customer(APPROVER)
    done = approver.post(
        f"/console/approvals/{request}/approve", data={"reason": "roll back", "csrf": csrf}
    )
    assert done.status_code == 303, done.text
    got = rollback(world.api, world.broker, approval_id=request)
    assert got["status"] == 200, got
    return request, str(got["grant_id"])


def test_the_owners_rollback_grant_offers_no_revoke_to_a_scoped_admin(world: World) -> None:
    request, grant = _owners_rollback_grant(world)
    vendor, csrf = world.browser(ADMIN)
    page = html.unescape(vendor.get(f"/console/grants/{grant}").text)
    assert f'action="/console/grants/{grant}/revoke"' not in page
    assert "You cannot revoke this grant" in page and "owners' rollback path" in page
    # ... and the server refuses the post anyway.
    out = vendor.post(f"/console/grants/{grant}/revoke", data={"reason": "x", "csrf": csrf})
    assert out.status_code == 403 and "owners' rollback path" in html.unescape(out.text)
    # The bulk revocation spares it, says so, and revokes the vendor's own grant.
    confirm = html.unescape(vendor.get("/console/revocations", params={"model": VENDOR_MODEL}).text)
    spared_part, active_part = confirm.split('id="spared"', 1)[1].split("This revokes", 1)
    assert grant in spared_part and world.vendor_grant not in spared_part
    assert grant not in active_part
    assert world.vendor_grant in active_part
    done = vendor.post(
        "/console/revocations",
        data={"model": VENDOR_MODEL, "reason": "vendor rotation", "csrf": csrf},
    )
    assert done.status_code == 200
    revoked, spared = done.text.split('id="spared"', 1)
    assert world.vendor_grant in revoked and grant in spared
    assert str(world.broker.grants.get(grant).status) == "active"
    assert str(world.broker.grants.get(world.vendor_grant).status) == "revoked"
    # The vendor's approver is offered no review of the owners' rollback requests either.
    again = rollback(world.api, world.broker)
    assert again["approval_id"] != request, again
    reviewer, _ = world.browser(APPROVER)
    asked = html.unescape(reviewer.get(f"/console/approvals/{again['approval_id']}").text)
    assert "You cannot review this request" in asked and "owners' rollback path" in asked
    # The customer's admin is offered the button.
    customer, _ = world.customer(ADMIN)
    assert (
        f'action="/console/grants/{grant}/revoke"' in customer.get(f"/console/grants/{grant}").text
    )


def test_a_scoped_approver_is_offered_the_vendors_requests(world: World) -> None:
    reviewer, _ = world.browser(APPROVER)
    page = reviewer.get(f"/console/approvals/{world.vendor_request}").text
    assert 'value="approve"' in page and "You cannot review" not in page


# --- the audit log -------------------------------------------------------------------------------


def test_a_scoped_auditor_is_offered_the_scoped_export(world: World) -> None:
    vendor, _ = world.browser(AUDITOR)
    page = vendor.get("/console/audit").text
    link = re.search(r'id="scoped-export" href="([^"]+)"', page)
    assert link is not None and 'href="/console/audit/export"' not in page
    whole = vendor.get("/console/audit/export")
    assert whole.status_code == 403 and "needs the role for every model" in whole.text
    got = vendor.get(html.unescape(link.group(1)))
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    doc = json.loads(got.content)
    assert doc["models"] == ["vendor-*"] and doc["entries"]
    report = verify_scoped(doc, world.broker.audit.verifier_key())
    assert report.ok, report.problems
    assert VENDOR_MODEL in got.text and "llama-7b" not in got.text
    # The customer's auditor is offered the whole log.
    customer, _ = world.customer(AUDITOR)
    page = customer.get("/console/audit").text
    assert 'href="/console/audit/export"' in page and "scoped-export" not in page
