"""The store's figures for /metrics read on PostgreSQL, as on SQLite (tests/test_metrics.py)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fastapi.testclient import TestClient

from broker.audit.log import AuditLog
from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form, person_token
from tests.scrape import parse
from tests.store.test_postgres import pg_broker  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration
LINEAGE = json.dumps({"datasets": ["s3://datasets/approved/set-1"]})


def test_the_store_figures_on_postgres(pg_broker: tuple[TestClient, Broker]) -> None:  # noqa: F811
    client, broker = pg_broker
    issued = client.post("/v1/token", data=exchange_form(eval_token(broker))).json()
    assert broker.dev_issuer is not None
    trainer = broker.dev_issuer.mint(
        sub="system:serviceaccount:training:t", claims={"kubernetes.io": {"namespace": "training"}}
    )
    form = exchange_form(trainer, action="fine-tune", lineage=LINEAGE)
    assert client.post("/v1/token", data=form).json()["error"] == "approval_required"
    admin = {"Authorization": f"Bearer {person_token(broker, 'admin', sub='root@example.com')}"}
    client.post(f"/v1/grants/{issued['grant_id']}/revoke", json={"reason": "x"}, headers=admin)
    with broker.store.write() as session:
        broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
    m = parse(client.get("/metrics").text)
    assert m.value("broker_store_scrape_error") == 0
    assert m.value("broker_approvals_pending") == 1
    assert m.value("broker_revocations_pending") == 0
    age = m.value("broker_audit_checkpoint_age_seconds")
    assert age is not None and 0 <= age < 60
    with broker.store.read() as session:
        size = AuditLog.size(session)
    assert m.value("broker_audit_log_size") == size
    assert m.value("broker_audit_checkpoint_size") == size  # signed just now: covers all
