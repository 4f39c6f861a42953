"""Who may use which console page: every route of the console, from every kind of viewer,
against one table (the console's counterpart of tests/api/test_access.py).

``PAGES`` is the contract of docs/api.md ("Console pages"), as data. A route the console serves
that ``PAGES`` lacks fails ``test_every_console_route_is_in_the_table``. Each route is then
asked by a signed-out browser and by people with each role (each with their own session and
its CSRF token): signed out is a redirect to sign-in (GET) or 401 (forms), a viewer the row
leaves out is 403, and one it admits gets anything else below 500.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount

from broker.console.app import PREFIX
from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form
from tests.console.support import console_of, open_request, sign_in

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROLES = ("approver", "auditor", "admin")
READERS = ROLES


@dataclass(frozen=True)
class Page:
    """``session``: whether the route needs a signed-in viewer; ``roles``: who passes (empty
    with a session: anyone signed in)."""

    session: bool
    roles: tuple[str, ...] = ()
    form: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)

    def doc_cells(self) -> tuple[str, str]:
        if not self.session:
            return "none", "anyone"
        return "session", ", ".join(self.roles) or "anyone signed in"


OPEN = Page(session=False)
REASON = {"reason": "access matrix"}

PAGES: dict[str, Page] = {
    # Signing in and out.
    "GET /console/": OPEN,
    "GET /console/signin": OPEN,
    "GET /console/login/{issuer}": OPEN,
    "GET /console/callback": OPEN,
    "POST /console/dev/signin": OPEN,
    "POST /console/signout": Page(session=True),
    "MOUNT /console/static": OPEN,
    # Approvals.
    "GET /console/approvals": Page(True, READERS),
    "GET /console/approvals/{approval_id}": Page(True, READERS),
    "POST /console/approvals/{approval_id}/approve": Page(True, ("approver",), REASON),
    "POST /console/approvals/{approval_id}/deny": Page(True, ("approver",), REASON),
    # Grants.
    "GET /console/grants": Page(True, ("auditor", "admin")),
    "GET /console/grants/{grant_id}": Page(True, ("auditor", "admin")),
    "POST /console/grants/{grant_id}/revoke": Page(True, ("admin",), REASON),
    "GET /console/revocations": Page(True, ("admin",), query={"model": "llama-7b"}),
    "POST /console/revocations": Page(True, ("admin",), {"model": "mistral-7b", **REASON}),
    # Records.
    "GET /console/lineage": Page(True, READERS, query={"model": "llama-7b"}),
    "GET /console/audit": Page(True, ("auditor", "admin")),
    "GET /console/audit/export": Page(True, ("auditor", "admin")),
}


def console_routes(app: FastAPI) -> set[str]:
    console = next(r for r in app.routes if isinstance(r, Mount) and r.path == PREFIX)
    found = set()
    routes: list[Any] = []
    for route in console.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        routes += contexts() if contexts is not None else [route]
    for route in routes:
        if isinstance(route, Mount):
            found.add(f"MOUNT {PREFIX}{route.path}")
        else:
            found |= {f"{m} {PREFIX}{route.path}" for m in route.methods - {"HEAD"}}  # type: ignore[attr-defined]
    return found


def test_every_console_route_is_in_the_table(app: FastAPI) -> None:
    routes = console_routes(app)
    assert sorted(routes - PAGES.keys()) == [], "console routes without an entry in PAGES"
    assert sorted(PAGES.keys() - routes) == [], "entries in PAGES for routes not served"


def _doc_rows() -> dict[str, tuple[str, str]]:
    section = API_DOC.read_text().split("## Console pages", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z]+ [^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, re.MULTILINE)
    return {route: (cookie.strip(), who.strip()) for route, cookie, who in rows}


def test_the_doc_states_the_table() -> None:
    assert {route: page.doc_cells() for route, page in PAGES.items()} == _doc_rows()


Outcome = Literal["ok", "signed out", "refused"]
VIEWERS = ("signed out", "no role", *ROLES)


def expected(page: Page, viewer: str) -> Outcome:
    if not page.session:
        return "ok"
    if viewer == "signed out":
        return "signed out"
    if not page.roles or viewer in page.roles:
        return "ok"
    return "refused"


def outcome(method: str, status: int, location: str | None) -> Outcome | str:
    if method == "GET" and status == 303 and location == "/console/signin":
        return "signed out"
    if method == "POST" and status == 401:
        return "signed out"
    if status == 403:
        return "refused"
    return "ok" if status < 500 and status != 401 else f"{status}"


@pytest.mark.parametrize("route", sorted(PAGES))
def test_page_admits_exactly_its_viewers(app: FastAPI, broker: Broker, route: str) -> None:
    page = PAGES[route]
    method, template = route.split(" ", 1)
    if method == "MOUNT":
        method, template = "GET", template + "/console.css"
    console_of(app)  # the console is mounted
    clients: dict[str, TestClient] = {}
    csrf: dict[str, str] = {}
    try:
        for viewer in VIEWERS:
            clients[viewer] = TestClient(app, follow_redirects=False).__enter__()
            if viewer != "signed out":
                roles = () if viewer == "no role" else (viewer,)
                csrf[viewer] = sign_in(
                    clients[viewer], f"{viewer.replace(' ', '-')}@example.com", *roles
                )
        first = clients["signed out"]
        issued = first.post("/v1/token", data=exchange_form(eval_token(broker)))
        assert issued.status_code == 200, issued.text
        path = template.format(
            approval_id=open_request(first, broker),
            grant_id=issued.json()["grant_id"],
            issuer="dev-people",
        )
        cells = {viewer: expected(page, viewer) for viewer in VIEWERS}
        got: dict[str, Outcome | str] = {}
        for viewer in sorted(VIEWERS, key=lambda v: cells[v] == "ok"):
            form = {**page.form, "csrf": csrf.get(viewer, "")} if method == "POST" else None
            resp = clients[viewer].request(method, path, params=page.query, data=form)
            got[viewer] = (
                outcome(method, resp.status_code, resp.headers.get("location"))
                if page.session
                else ("ok" if resp.status_code < 500 else str(resp.status_code))
            )
            if got[viewer] == "refused" and cells[viewer] == "refused":
                assert "needs role" in resp.text, resp.text
        assert got == cells
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
