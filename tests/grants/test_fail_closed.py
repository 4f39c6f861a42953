"""Fail closed on the paths that hand out a broker JWT: when the store refuses the exchange's
event (a real SQLite trigger aborts every insert into ``events``), the exchange answers 503
with no credential and leaves no grant. The external backends' paths, whose credential exists
at the backend before the commit, are in tests/backends/vault and tests/backends/aws."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from broker.runtime import Broker
from tests.approvals.test_flow import ask, review
from tests.conftest import eval_token, exchange_form
from tests.faults import grant_statuses, inserts_blocked


def assert_unavailable(resp: Any) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert "access_token" not in resp.text


def test_group_commit_exchange_refuses_when_its_event_cannot_be_written(
    client: TestClient, broker: Broker
) -> None:
    with inserts_blocked(broker, "events"):
        assert_unavailable(client.post("/v1/token", data=exchange_form(eval_token(broker))))
    assert grant_statuses(broker) == {}
    # The trigger gone, the same broker issues again without a restart.
    assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200


def test_approved_exchange_refuses_when_its_event_cannot_be_written(
    client: TestClient, broker: Broker
) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    assert review(client, broker, approval_id, "approve", "bob@example.com").status_code == 200

    with inserts_blocked(broker, "events"):
        assert_unavailable(ask(client, broker, approval_id=approval_id))
    assert grant_statuses(broker) == {}
    # Nothing of the attempt committed: the approval was not spent either.
    assert broker.approvals.get(approval_id)["status"] == "approved"

    issued = ask(client, broker, approval_id=approval_id)
    assert issued.status_code == 200, issued.text
    assert grant_statuses(broker) == {issued.json()["grant_id"]: "active"}
    assert broker.approvals.get(approval_id)["status"] == "used"
