"""Helpers of the console tests: reach the mounted console, sign in, open a request."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount

from broker.console.web import Console
from broker.runtime import Broker

CSRF = re.compile(r'name="csrf" value="([^"]*)"')
TRAINER = "system:serviceaccount:training:trainer"


def console_of(app: FastAPI) -> Console:
    """The console mounted in ``app`` (to reach its cookies' clock)."""
    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == "/console")
    console: Console = mount.app.state.console  # type: ignore[attr-defined]
    return console


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(client: TestClient, name: str, *roles: str) -> str:
    """Sign ``client`` in through the dev form; returns the session's CSRF token."""
    page = client.get("/console/signin")
    assert page.status_code == 200, page.text
    done = client.post(
        "/console/dev/signin",
        data={"name": name, "roles": list(roles), "csrf": csrf_of(page.text)},
    )
    assert done.status_code == 200, done.text
    return csrf_of(client.get("/console/approvals").text)


def open_request(
    client: TestClient, broker: Broker, *, reason: str = "nightly fine-tune", **claims: Any
) -> str:
    """A fine-tune request opened by a training workload (``claims`` added to its token)."""
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(
        sub=TRAINER, claims={"kubernetes.io": {"namespace": "training"}, **claims}
    )
    body = {
        "model": "llama-7b",
        "action": "fine-tune",
        "lineage": {"datasets": [{"uri": "s3://datasets/approved/set-1"}]},
        "reason": reason,
    }
    opened = client.post("/v1/approvals", json=body, headers={"Authorization": f"Bearer {token}"})
    assert opened.status_code == 201, opened.text
    return str(opened.json()["id"])
