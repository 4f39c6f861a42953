"""The state checks on PostgreSQL: its collation must not break the merge by grant id, and
each check reads one snapshot."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, insert, text

from broker.api.app import create_app
from broker.audit.state import snapshot, verify_state
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import GrantRow
from tests.audit.conftest import bearer
from tests.conftest import eval_token, exchange_form
from tests.servers import Postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_broker(postgres: Postgres, tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    name = f"broker_{secrets.token_hex(4)}"
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # NOTE: a collation that orders ids unlike Python (the cluster's default here is C).
        if not conn.scalar(text("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")):
            pytest.skip("this PostgreSQL has no ICU collations")
        conn.execute(
            text(
                f"CREATE DATABASE {name} LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
                "LOCALE 'C.UTF-8' TEMPLATE template0"
            )
        )
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    broker = build_broker(
        Settings(dev=True, data_dir=tmp_path / "data", policy=EXAMPLE_POLICY, database_url=url)
    )
    try:
        with TestClient(create_app(broker=broker)) as client:
            yield client, broker
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def findings(broker: Broker) -> list[str]:
    with broker.store.read() as session:
        return [str(f) for f in verify_state(snapshot(session))]


def test_the_state_checks_agree_with_a_store_the_broker_wrote_on_postgres(
    pg_broker: tuple[TestClient, Broker],
) -> None:
    client, broker = pg_broker
    issued = [client.post("/v1/token", data=exchange_form(eval_token(broker))) for _ in range(3)]
    assert all(r.status_code == 200 for r in issued)
    grant = issued[0].json()["grant_id"]
    revoke = client.post(
        f"/v1/grants/{grant}/revoke", json={"reason": "x"}, headers=bearer(broker, "admin")
    )
    assert revoke.status_code == 200
    # Ids that this database's collation orders unlike Python (case, punctuation): failed
    # grants with their grant.failed events, which agree with each other.
    now = dt.datetime.now(dt.UTC)
    row = {
        "issuer": "dev",
        "issuer_url": "https://dev.broker.invalid/workload",
        "subject": "s",
        "identity_claims": {},
        "model": "llama-7b",
        "action": "evaluate",
        "tier": "low",
        "backend": "vault",
        "rule": "r",
        "policy_digest": "d",
        "issued_at": now,
        "expires_at": now,
        "status": "failed",
    }
    with broker.store.write() as session:
        for grant_id in ("g_a", "g_B", "g-b", "G_c", "g_ä"):
            session.execute(insert(GrantRow), {**row, "id": grant_id})
            broker.audit.append(session, "grant.failed", now, {"stuck": True}, grant_id=grant_id)
        # Keys in one stream only: a grant still issuing (no event yet), and an orphan
        # credential the reconciler removed (an event, no grant).
        session.execute(insert(GrantRow), {**row, "id": "G_Issuing", "status": "issuing"})
        broker.audit.append(session, "reconcile.revoked", now, {}, grant_id="g_Orphan")
    assert findings(broker) == []
    assert broker.state.round() == []
    with broker.store.write() as session:
        session.execute(
            text("UPDATE grants SET status = 'active', revoked_at = NULL WHERE id = :id"),
            {"id": grant},
        )
    assert any(
        f.startswith(f"grant {grant}: the grants table says active") for f in findings(broker)
    )
    assert any(f.what == f"grant {grant}" for f in broker.state.round())
