"""Fail closed on both writes of a Vault exchange, with the store failing for real (a SQLite
trigger on the broker's file aborts every insert into one table):

- the ``issuing`` row cannot be written: 503, and Vault is never asked for a credential;
- the activation (with its ``exchange.allowed`` event) cannot be written, in the group commit
  and in an approved exchange's own transaction: 503, no credential in the answer, the grant
  ``failed``, and what Vault issued has been revoked there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.backends.base import Credential
from broker.grants.model import Grant
from broker.runtime import Broker
from tests.backends.vault.conftest import VaultSetup
from tests.backends.vault.test_vault_exchange import K8S, LINEAGE, TRAINER, VAULT, make_broker
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, exchange_form, person_token
from tests.faults import grant_statuses, inserts_blocked
from tests.servers import Postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def served(tmp_path: Path, vault: VaultSetup) -> Iterator[tuple[TestClient, Broker]]:
    broker = make_broker(tmp_path / "data", vault)
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


@pytest.fixture
def issued(served: tuple[TestClient, Broker], monkeypatch: pytest.MonkeyPatch) -> list[Credential]:
    """Every credential the broker's vault backend issues (the answer may not show them)."""
    backend = served[1].grants.backends.for_token_type(VAULT)
    issue = backend.issue
    credentials: list[Credential] = []

    def recording(grant: Grant) -> Credential:
        credentials.append(issue(grant))
        return credentials[-1]

    monkeypatch.setattr(backend, "issue", recording)
    return credentials


def fine_tune_form(broker: Broker, **extra: str) -> dict[str, str]:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=TRAINER, claims=K8S)
    return exchange_form(
        token, action="fine-tune", lineage=LINEAGE, requested_token_type=VAULT, **extra
    )


def approved(client: TestClient, broker: Broker) -> str:
    """An approval request for a Vault fine-tune, approved by bob."""
    approval_id = str(client.post("/v1/token", data=fine_tune_form(broker)).json()["approval_id"])
    bob = {"Authorization": f"Bearer {person_token(broker, 'approver', sub='bob@example.com')}"}
    resp = client.post(f"/v1/approvals/{approval_id}/approve", json={"reason": "ok"}, headers=bob)
    assert resp.json()["status"] == "approved", resp.text
    return approval_id


def assert_unavailable(resp: Any) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert "access_token" not in resp.text and "username" not in resp.text


def test_no_issuing_row_means_vault_is_never_asked(
    served: tuple[TestClient, Broker], vault: VaultSetup, issued: list[Credential]
) -> None:
    client, broker = served
    approval_id = approved(client, broker)
    live = set(broker.grants.backends.get("vault").list_live())  # type: ignore[attr-defined]
    with inserts_blocked(broker, "grants"):
        assert_unavailable(
            client.post("/v1/token", data=fine_tune_form(broker, approval_id=approval_id))
        )
    assert issued == []
    assert set(broker.grants.backends.get("vault").list_live()) <= live  # type: ignore[attr-defined]
    assert grant_statuses(broker) == {}
    assert broker.approvals.get(approval_id)["status"] == "approved"


def test_approved_activation_that_cannot_be_recorded_revokes_the_vault_token(
    served: tuple[TestClient, Broker], vault: VaultSetup, issued: list[Credential]
) -> None:
    client, broker = served
    approval_id = approved(client, broker)
    with inserts_blocked(broker, "events"):
        assert_unavailable(
            client.post("/v1/token", data=fine_tune_form(broker, approval_id=approval_id))
        )
    [credential] = issued
    assert list(grant_statuses(broker).values()) == ["failed"]
    assert not vault.server.token_works(credential.access_token)
    assert broker.approvals.get(approval_id)["status"] == "approved"


def test_group_commit_activation_that_cannot_be_recorded_revokes_the_database_login(
    served: tuple[TestClient, Broker], database: Postgres, issued: list[Credential]
) -> None:
    client, broker = served
    assert broker.dev_issuer is not None
    workload = broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
    with inserts_blocked(broker, "events"):
        resp = client.post("/v1/token", data=exchange_form(workload, requested_token_type=VAULT))
        assert_unavailable(resp)
    [login] = issued
    assert list(grant_statuses(broker).values()) == ["failed"]
    assert not database.login_works(str(login.extra["username"]), login.access_token)
    assert login.access_token not in resp.text
