"""Who may call what: every route the app serves, from every kind of caller, against one table.

``ACCESS`` is the contract of docs/api.md ("Who may call what"), as data; the console's pages
(mounted at /console, signed in by session cookie, not bearer) have their own table in
tests/console/test_access.py. A route that the app
serves and ``ACCESS`` lacks fails ``test_every_served_route_is_in_the_table``; a row of the doc
that disagrees with ``ACCESS`` fails ``test_the_doc_states_the_table``. Each route then gets one
test that sends it a real request from every caller and compares the answers with the table:
401 ``invalid_token`` for a missing or bad bearer (garbage, the wrong kind of identity, a person
token for another audience), 403 ``insufficient_role`` for a valid caller that the rule leaves
out, and anything else below 500 (the request itself may still be refused) for one it admits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount

from broker.api.app import create_app
from broker.console.app import PREFIX as CONSOLE
from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form, person_token

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"

TRAINER = "system:serviceaccount:training:trainer"
OTHER_TRAINER = "system:serviceaccount:training:other"
K8S = {"kubernetes.io": {"namespace": "training"}}
FINE_TUNE = {
    "model": "llama-7b",
    "action": "fine-tune",
    "lineage": {"datasets": [{"uri": "s3://datasets/approved/set-1"}]},
}
ROLES = ("approver", "auditor", "admin")
READERS = ROLES


@dataclass(frozen=True)
class Rule:
    """Who passes a route's authentication and authorisation.

    ``bearer``: which identity the route reads from ``Authorization`` (``none``: it reads none).
    ``roles``: the people who pass (empty with bearer ``any``: every person). ``own``: a
    workload passes only for its own approval request.
    """

    bearer: Literal["none", "person", "workload", "any"]
    roles: tuple[str, ...] = ()
    own: bool = False
    note: str = ""
    """What decides after the route's own gate, as docs/api.md says it in parentheses."""

    def doc_cells(self) -> tuple[str, str]:
        """The row's "bearer" and "who passes" cells in docs/api.md."""
        workloads = "the requesting workload" if self.own else "any workload"
        if self.bearer == "none":
            return "none", "anyone"
        if self.bearer == "person":
            return "person", ", ".join(self.roles)
        if self.bearer == "workload":
            return "workload", workloads + (f" ({self.note})" if self.note else "")
        return "person or workload", f"{', '.join(self.roles) or 'any person'}; {workloads}"


@dataclass(frozen=True)
class Entry:
    rule: Rule
    query: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    form: dict[str, str] | None = None


PUBLIC = Entry(Rule("none"))
REASON = {"reason": "access matrix"}

ACCESS: dict[str, Entry] = {
    # Exchange and introspection. /v1/token authenticates the subject token in its form, never
    # a bearer: its refusals are 400s (tests/api/test_token.py).
    "POST /v1/token": Entry(Rule("none"), form={}),
    "POST /v1/introspect": Entry(Rule("any"), form={"token": "not-a-broker-jwt"}),
    # Grants and keys.
    "GET /v1/grants": Entry(Rule("person", ("auditor", "admin"))),
    "GET /v1/grants/{grant_id}": Entry(Rule("person", ("auditor", "admin"))),
    "POST /v1/grants/{grant_id}/revoke": Entry(Rule("person", ("admin",)), json=REASON),
    "POST /v1/revocations": Entry(Rule("person", ("admin",)), json={"model": "x", **REASON}),
    "POST /v1/keys/rotate": Entry(Rule("person", ("admin",))),
    # The audit log.
    "GET /v1/audit/checkpoint": Entry(Rule("person", ("auditor", "admin"))),
    "GET /v1/audit/key": Entry(Rule("person", ("auditor", "admin"))),
    "GET /v1/audit/entries": Entry(
        Rule("person", ("auditor", "admin")), query={"start": 0, "end": 1}
    ),
    "GET /v1/audit/proof/inclusion": Entry(
        Rule("person", ("auditor", "admin")), query={"index": 0, "size": 1}
    ),
    "GET /v1/audit/proof/consistency": Entry(
        Rule("person", ("auditor", "admin")), query={"from": 1, "to": 1}
    ),
    "GET /v1/audit/export": Entry(Rule("person", ("auditor", "admin")), query={"model": "llama-*"}),
    # Approvals and lineage.
    "POST /v1/approvals": Entry(Rule("workload"), json=FINE_TUNE),
    "GET /v1/approvals": Entry(Rule("person", READERS)),
    "GET /v1/approvals/{approval_id}": Entry(Rule("any", READERS, own=True)),
    "POST /v1/approvals/{approval_id}/approve": Entry(Rule("person", ("approver",)), json=REASON),
    "POST /v1/approvals/{approval_id}/deny": Entry(Rule("person", ("approver",)), json=REASON),
    "POST /v1/approvals/{approval_id}/cancel": Entry(Rule("workload", own=True), json=REASON),
    "GET /v1/lineage/{model}": Entry(Rule("person", READERS)),
    # Rollback tests: any workload authenticates; the policy then decides (403 access_denied).
    "POST /v1/rollback-tests": Entry(
        Rule("workload", note="then the policy: a rule granting `rollback-test` on the model"),
        json={
            "model": "llama-7b",
            "rollback_point": {"uri": "s3://models/llama-7b/v1", "sha256": "ab" * 32},
            "result": "passed",
        },
    ),
    "GET /v1/rollback-tests": Entry(Rule("person", READERS), query={"model": "llama-7b"}),
    # Discovery, health, metrics, the OpenAPI document and its viewers.
    "GET /.well-known/openid-configuration": PUBLIC,
    "GET /.well-known/jwks.json": PUBLIC,
    "GET /healthz": PUBLIC,
    "GET /readyz": PUBLIC,
    "GET /metrics": PUBLIC,
    "GET /openapi.json": PUBLIC,
    "GET /docs": PUBLIC,
    "GET /docs/oauth2-redirect": PUBLIC,
    "GET /redoc": PUBLIC,
    # Mounted only in dev mode (loopback only): the dev issuer itself.
    "POST /dev/token": Entry(Rule("none"), json={"sub": "someone"}),
}


# --- callers ---------------------------------------------------------------------------------

Caller = Callable[[Broker], dict[str, str]]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _workload(sub: str) -> Caller:
    def headers(broker: Broker) -> dict[str, str]:
        assert broker.dev_issuer is not None
        return _bearer(broker.dev_issuer.mint(sub=sub, claims=K8S))

    return headers


def _person(*roles: str) -> Caller:
    return lambda broker: _bearer(person_token(broker, *roles))


def _wrong_audience(broker: Broker) -> dict[str, str]:
    assert broker.dev_issuer is not None
    # The people issuer's key and an admin's groups, but the workloads' audience.
    return _bearer(
        broker.dev_issuer.mint(sub="alice@example.com", roles=["admin"], aud="model-broker")
    )


CALLERS: dict[str, Caller] = {
    "no token": lambda _broker: {},
    "garbage": lambda _broker: _bearer("garbage"),
    "workload": _workload(TRAINER),  # the requester of the approval request under test
    "other workload": _workload(OTHER_TRAINER),
    "person, wrong aud": _wrong_audience,
    "person, no role": _person(),
    **{role: _person(role) for role in ROLES},
}

Outcome = Literal["ok", "invalid_token", "insufficient_role"]


def expected(rule: Rule, caller: str) -> Outcome:
    """What ``rule`` answers ``caller``: admitted, 401 or 403."""
    if rule.bearer == "none":
        return "ok"
    if caller in ("no token", "garbage", "person, wrong aud"):
        return "invalid_token"
    if caller in ("workload", "other workload"):
        if rule.bearer == "person":
            return "invalid_token"
        return "insufficient_role" if rule.own and caller == "other workload" else "ok"
    if rule.bearer == "workload":
        return "invalid_token"
    role = caller if caller in ROLES else None
    admitted = (rule.bearer == "any" and not rule.roles) or role in rule.roles
    return "ok" if admitted else "insufficient_role"


def says_why(rule: Rule, caller: str, body: dict[str, Any]) -> bool:
    """Whether a refusal's description names what was wrong (and, for a person without the
    role, which roles would pass and which the person has)."""
    text = str(body.get("error_description", ""))
    if body.get("error") == "invalid_token":
        if caller == "no token":
            return text.startswith("missing bearer token")
        # A person token where a workload is read is refused for its kind, before its audience.
        wrong_aud = caller == "person, wrong aud" and rule.bearer != "workload"
        return text.startswith("bearer token rejected: ") and (not wrong_aud or "aud" in text)
    if caller in ("workload", "other workload"):
        return "only" in text and ("own" in text or "requester" in text)
    has = f"['{caller}']" if caller in ROLES else "none"
    return f"needs role {' or '.join(rule.roles)}; has {has}" in text


def outcome(status: int, body: str, error: str | None) -> Outcome | str:
    if status == 401 and error == "invalid_token":
        return "invalid_token"
    if status == 403 and error == "insufficient_role":
        return "insufficient_role"
    # NOTE: past the route's own gate: the policy's refusal (access_denied) and a dependency
    # that is down (/readyz without AWS credentials here) say nothing about who may call.
    if error in ("access_denied", "temporarily_unavailable"):
        return "ok"
    if status < 500 and status not in (401, 403):
        return "ok"
    return f"{status} {body[:200]}"


# --- the route table -------------------------------------------------------------------------


def served(app: FastAPI) -> set[str]:
    """Every ``METHOD /path`` the app answers: its routes (flattened through included routers)
    and the OpenAPI paths (``POST /v1/token`` is served in front of the router)."""
    found: set[str] = set()

    def walk(routes: list[Any]) -> Iterator[Any]:
        for route in routes:
            contexts = getattr(route, "effective_route_contexts", None)
            yield from contexts() if contexts is not None else [route]

    for route in walk(app.routes):
        if isinstance(route, Mount):
            # The console is an app of its own with its own table (tests/console/test_access.py);
            # any other mount is listed as such, so that it fails the table until it has rows.
            if route.path != CONSOLE:
                found.add(f"MOUNT {route.path}")
            continue
        found |= {f"{m} {route.path}" for m in route.methods - {"HEAD"}}
    for path, item in app.openapi()["paths"].items():
        found |= {f"{method.upper()} {path}" for method in item}
    return found


@pytest.fixture
def app(broker: Broker) -> FastAPI:
    return create_app(broker=broker)


def test_every_served_route_is_in_the_table(app: FastAPI) -> None:
    routes = served(app)
    assert len(routes) > 20  # the walk found the included routers' routes
    assert sorted(routes - ACCESS.keys()) == [], "routes without an entry in ACCESS"
    assert sorted(ACCESS.keys() - routes) == [], "entries in ACCESS for routes not served"


def _doc_rows() -> dict[str, tuple[str, str]]:
    text = API_DOC.read_text()
    section = text.split("## Who may call what", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z]+ [^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, re.MULTILINE)
    return {route: (bearer.strip(), who.strip()) for route, bearer, who in rows}


def test_the_doc_states_the_table() -> None:
    documented = _doc_rows()
    assert {route: entry.rule.doc_cells() for route, entry in ACCESS.items()} == documented


# --- every route, every caller ------------------------------------------------------------


@dataclass
class World:
    """A grant and an approval request (opened by ``TRAINER``) for the routes to act on."""

    grant_id: str
    approval_id: str

    def path(self, template: str) -> str:
        return template.format(
            grant_id=self.grant_id, approval_id=self.approval_id, model="llama-7b"
        )


def _world(client: TestClient, broker: Broker) -> World:
    issued = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert issued.status_code == 200, issued.text
    opened = client.post("/v1/approvals", json=FINE_TUNE, headers=CALLERS["workload"](broker))
    assert opened.status_code == 201, opened.text
    return World(issued.json()["grant_id"], opened.json()["id"])


@pytest.mark.parametrize("route", sorted(ACCESS))
def test_route_admits_exactly_its_callers(route: str, client: TestClient, broker: Broker) -> None:
    entry = ACCESS[route]
    method, template = route.split(" ", 1)
    world = _world(client, broker)
    cells = {caller: expected(entry.rule, caller) for caller in CALLERS}
    # Refusals first: an admitted call may change the state (approve, revoke, cancel) that a
    # later refusal would otherwise be judged against.
    order = sorted(CALLERS, key=lambda caller: cells[caller] == "ok")
    got: dict[str, Outcome | str] = {}
    unexplained: list[str] = []
    for caller in order:
        headers = CALLERS[caller](broker)
        resp = client.request(
            method,
            world.path(template),
            params=entry.query,
            json=entry.json,
            data=entry.form,
            headers=headers,
        )
        is_json = resp.headers.get("content-type", "").startswith("application/json")
        body = resp.json() if is_json and isinstance(resp.json(), dict) else {}
        got[caller] = outcome(resp.status_code, resp.text, body.get("error"))
        if got[caller] == cells[caller] != "ok" and not says_why(entry.rule, caller, body):
            unexplained.append(f"{caller}: {body.get('error_description')!r}")
        token = headers.get("Authorization", "").removeprefix("Bearer ")
        assert len(token) < 20 or token not in resp.text, f"{caller}'s token echoed"
    assert got == cells
    assert unexplained == [], "refusals that do not say why"
