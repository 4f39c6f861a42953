"""The vault backend's calls in the metrics, against real OpenBao: issue and revoke timed per
backend, a revocation that cannot reach Vault counted as an error and waiting in the queue."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from tests.backends.vault.conftest import VaultSetup
from tests.backends.vault.test_vault_exchange import admin, approved_fine_tune, make_broker
from tests.scrape import parse
from tests.servers import free_port_pair

pytestmark = pytest.mark.integration
SECONDS = "broker_backend_call_seconds_count"
ERRORS = "broker_backend_call_errors_total"


def test_vault_calls_and_a_waiting_revocation_show_in_the_metrics(
    tmp_path: Path, vault: VaultSetup
) -> None:
    data = tmp_path / "data"
    first = make_broker(data, vault)
    with TestClient(create_app(broker=first)) as client:
        issued = approved_fine_tune(client, first)
        m = parse(client.get("/metrics").text)
    assert m.value(SECONDS, backend="vault", operation="issue") == 1
    assert m.value(ERRORS, backend="vault", operation="issue") is None
    labels = {"model": "llama-7b", "action": "fine-tune", "backend": "vault"}
    assert m.value("broker_exchanges_total", **labels, outcome="approval_required") == 1
    assert m.value("broker_exchanges_total", **labels, outcome="issued") == 1
    assert m.value("broker_exchange_seconds_count", backend="vault") == 2

    dead = f"http://127.0.0.1:{free_port_pair()}"
    second = make_broker(data, vault, addr=dead)  # a restart while Vault is unreachable
    with TestClient(create_app(broker=second)) as client:
        resp = client.post(
            f"/v1/grants/{issued['grant_id']}/revoke", json={"reason": "x"}, headers=admin(second)
        )
        assert resp.json()["backend_revocation"] == "pending"
        m = parse(client.get("/metrics").text)
    assert m.value(SECONDS, backend="vault", operation="revoke") == 1
    assert m.value(ERRORS, backend="vault", operation="revoke") == 1
    assert m.value("broker_revocations_pending") == 1
    oldest = m.value("broker_revocation_oldest_pending_seconds")
    assert oldest is not None and oldest >= 0
