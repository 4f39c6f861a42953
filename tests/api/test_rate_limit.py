"""Unverifiable attempts draw from a per-address budget: 429 with Retry-After once it is spent,
before any verification; healthy clients and verified identities are never slowed; what the
budget held back is summarised in the log, not lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import EventRow
from tests.conftest import eval_token, exchange_form, person_token

BURST = 3
PROXY = "127.0.0.1"


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    """A broker with a budget of BURST unverifiable attempts (and almost no refill), behind a
    trusted proxy at 127.0.0.1, so X-Forwarded-For names the client."""
    settings = Settings(
        dev=True,
        data_dir=tmp_path / "data",
        policy=EXAMPLE_POLICY,
        refusal_burst=BURST,
        refusal_rate=0.01,
        trusted_proxies=f"{PROXY}, 10.0.0.0/8",
    )
    b = build_broker(settings)
    with TestClient(create_app(broker=b), client=(PROXY, 40000)) as c:
        yield c, b
    b.close()


def from_(client: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"{client}, 10.1.2.3"}


def garbage(c: TestClient, who: str, **form: str) -> Any:
    return c.post("/v1/token", data=exchange_form("not.a.jwt", **form), headers=from_(who))


def events(broker: Broker, kind: str) -> list[dict[str, Any]]:
    with broker.store.read() as s:
        rows = s.scalars(select(EventRow).where(EventRow.type == kind).order_by(EventRow.idx))
        return [json.loads(r.body) for r in rows]


def test_the_budget_once_spent_answers_429_before_verification(
    limited: tuple[TestClient, Broker],
) -> None:
    c, broker = limited
    for _ in range(BURST):
        assert garbage(c, "198.51.100.7").status_code == 400
    assert len(events(broker, "exchange.denied")) == BURST  # in budget: one event each
    resp = garbage(c, "198.51.100.7")
    assert resp.status_code == 429
    assert resp.json()["error"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    # Before any verification: even a valid token from that address waits.
    valid = c.post(
        "/v1/token", data=exchange_form(eval_token(broker)), headers=from_("198.51.100.7")
    )
    assert valid.status_code == 429
    assert len(events(broker, "exchange.denied")) == BURST  # nothing more written one by one


def test_other_clients_and_verified_identities_are_not_charged(
    limited: tuple[TestClient, Broker],
) -> None:
    c, broker = limited
    for _ in range(BURST + 2):
        garbage(c, "198.51.100.7")
    ok = c.post("/v1/token", data=exchange_form(eval_token(broker)), headers=from_("203.0.113.9"))
    assert ok.status_code == 200, ok.text
    # Many successes and verified denials from one client never spend its budget.
    for _ in range(BURST * 3):
        good = exchange_form(eval_token(broker))
        assert c.post("/v1/token", data=good, headers=from_("203.0.113.9")).status_code == 200
        denied = exchange_form(eval_token(broker, claims={"job_workflow_ref": "x"}))
        assert c.post("/v1/token", data=denied, headers=from_("203.0.113.9")).status_code == 403
    assert garbage(c, "203.0.113.9").status_code == 400


def test_what_the_budget_held_back_is_summarised_by_reason(
    limited: tuple[TestClient, Broker],
) -> None:
    c, broker = limited
    for _ in range(BURST):
        c.post(
            "/v1/token",
            data={"grant_type": "password"},  # malformed: refused before any token is read
            headers=from_("198.51.100.7"),
        )
    for _ in range(5):
        assert garbage(c, "198.51.100.7").status_code == 429
    broker.maintain()
    [summary] = events(broker, "refusals.summary")
    assert summary["client"] == "198.51.100.7" and summary["endpoint"] == "/v1/token"
    assert summary["counts"] == {"rate_limited": 5, "unsupported_grant_type": BURST}
    assert summary["total"] == BURST + 5
    broker.maintain()
    assert len(events(broker, "refusals.summary")) == 1  # counted once


def test_introspection_callers_share_the_budget(limited: tuple[TestClient, Broker]) -> None:
    c, broker = limited
    bad = {**from_("198.51.100.8"), "Authorization": "Bearer not-a-jwt"}
    for _ in range(BURST):
        assert c.post("/v1/introspect", data={"token": "x"}, headers=bad).status_code == 401
    assert c.post("/v1/introspect", data={"token": "x"}, headers=bad).status_code == 429
    good = {**from_("198.51.100.9"), "Authorization": f"Bearer {person_token(broker)}"}
    assert c.post("/v1/introspect", data={"token": "x"}, headers=good).json() == {"active": False}
    broker.maintain()
    [summary] = events(broker, "refusals.summary")
    assert summary["endpoint"] == "/v1/introspect"
    assert summary["counts"] == {"malformed": BURST, "rate_limited": 1}


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    settings = Settings(
        dev=True,
        data_dir=tmp_path / "data",
        policy=EXAMPLE_POLICY,
        refusal_burst=BURST,
        refusal_rate=0.01,
    )
    b = build_broker(settings)
    try:
        with TestClient(create_app(broker=b), client=("192.0.2.1", 40000)) as c:
            for n in range(BURST):
                # A new "client" every time: it would never run dry if the header were believed.
                assert garbage(c, f"198.51.100.{n}").status_code == 400
            assert garbage(c, "198.51.100.200").status_code == 429
    finally:
        b.close()
