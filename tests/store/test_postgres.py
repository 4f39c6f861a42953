"""The same broker on PostgreSQL (BROKER_DATABASE_URL): migrations, exchanges, replay
protection under concurrency, revocation and audit verification, on a real server."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, select, text

from broker.api.app import create_app
from broker.audit.checkpoint import NoteVerifier
from broker.audit.export import verify_store
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import EventRow, UsedTokenRow
from tests.approvals.support import drill_token, report_test
from tests.conftest import eval_token, exchange_form, person_token, post_concurrently
from tests.servers import Postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_broker(postgres: Postgres, tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    name = f"broker_{secrets.token_hex(4)}"
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
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


def test_exchange_revoke_and_verify_on_postgres(pg_broker: tuple[TestClient, Broker]) -> None:
    client, broker = pg_broker
    assert broker.store.engine.dialect.name == "postgresql"
    ok = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert ok.status_code == 200, ok.text
    assert (
        client.post("/v1/token", data=exchange_form(eval_token(broker), action="nope")).status_code
        == 400
    )
    admin = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
    grant_id = ok.json()["grant_id"]
    assert (
        client.post(
            f"/v1/grants/{grant_id}/revoke", json={"reason": "x"}, headers=admin
        ).status_code
        == 200
    )
    assert (
        client.post(
            f"/v1/grants/{grant_id}/revoke", json={"reason": "x"}, headers=admin
        ).status_code
        == 409
    )
    auditor = {"Authorization": f"Bearer {person_token(broker, 'auditor')}"}
    assert client.get("/v1/audit/checkpoint", headers=auditor).status_code == 200
    with broker.store.read() as session:
        # policy.loaded, allowed, denied, revoked, backend revocation confirmed
        assert list(session.scalars(select(EventRow.idx).order_by(EventRow.idx))) == list(range(5))
        report = verify_store(session, NoteVerifier.from_vkey(broker.audit.verifier_key()))
    assert report.ok and report.size == 5, report.problems


def test_single_use_tokens_under_concurrency_on_postgres(
    pg_broker: tuple[TestClient, Broker],
) -> None:
    client, broker = pg_broker
    token = eval_token(broker)
    results = [status for status, _ in post_concurrently(client, [exchange_form(token)] * 8)]
    assert sorted(results) == [200] + [400] * 7
    with broker.store.read() as session:
        idx = list(session.scalars(select(EventRow.idx).order_by(EventRow.idx)))
    assert idx == list(range(len(idx))) and len(idx) == 9  # policy.loaded + 8 attempts, dense


def test_writers_are_not_serialised_in_process_on_postgres(
    pg_broker: tuple[TestClient, Broker],
) -> None:
    # On SQLite one writer of a process waits for the other; PostgreSQL's row locks serialise
    # only what must be (log_head), so a second write commits while the first is still open.
    _, broker = pg_broker
    expires = dt.datetime.now(dt.UTC)
    committed = threading.Event()

    def other() -> None:
        with broker.store.write() as s:
            s.add(UsedTokenRow(issuer="i", jti="second", expires_at=expires))
        committed.set()

    with broker.store.write() as s:
        s.add(UsedTokenRow(issuer="i", jti="first", expires_at=expires))
        s.flush()
        thread = threading.Thread(target=other)
        thread.start()
        assert committed.wait(5)
    thread.join()


def test_concurrent_exchanges_keep_the_log_exact_on_postgres(
    pg_broker: tuple[TestClient, Broker],
) -> None:
    client, broker = pg_broker
    replayed = eval_token(broker)
    forms = [exchange_form(eval_token(broker)) for _ in range(16)]
    forms += [exchange_form(replayed) for _ in range(4)]
    results = [status for status, _ in post_concurrently(client, forms)]
    assert results[:16] == [200] * 16
    assert sorted(results[16:]) == [200, 400, 400, 400]
    with broker.store.write() as session:
        broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
    with broker.store.read() as session:
        report = verify_store(session, NoteVerifier.from_vkey(broker.audit.verifier_key()))
    assert report.ok and report.size == 1 + 20, report.problems


def test_the_write_probe_on_postgres(pg_broker: tuple[TestClient, Broker]) -> None:
    _, broker = pg_broker
    assert broker.store.probe_write() is None
    assert broker.store.truncate_wal() is True  # nothing to do: not SQLite
    broker.store.engine.dispose()

    def read_only(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET default_transaction_read_only = on")  # as on a standby
        dbapi_conn.commit()  # a SET inside a transaction would end with it

    event.listen(broker.store.engine, "connect", read_only)
    try:
        assert broker.store.probe_write() == "the store is read-only (a standby database?)"
    finally:
        event.remove(broker.store.engine, "connect", read_only)
        broker.store.engine.dispose()


def test_rollback_test_reports_spend_their_token_once_on_postgres(
    pg_broker: tuple[TestClient, Broker],
) -> None:
    """A replayed report fails its spend inside a PostgreSQL transaction (which aborts it); the
    refusal is still recorded, in a transaction of its own."""
    client, broker = pg_broker
    token = drill_token(broker)
    assert report_test(client, token).status_code == 201
    again = report_test(client, token)
    assert again.status_code == 401 and "replayed" in again.json()["error_description"]
    with broker.store.read() as session:
        types = list(session.scalars(select(EventRow.type).order_by(EventRow.idx)))
    assert types == ["policy.loaded", "rollback_test.recorded", "rollback_test.refused"]
    assert [t["result"] for t in broker.rollback_tests.find()] == ["passed"]


def test_one_token_raced_through_two_brokers_is_spent_once_on_postgres(
    pg_broker: tuple[TestClient, Broker], tmp_path: Path
) -> None:
    """Two brokers (two engines, as two replicas) on one database: a token sent to both at once
    gets one 200, and the other exchanges committed in the same group commits are not failed
    with it (each batch spends what it can and refuses only what another process spent)."""
    client, broker = pg_broker
    other = build_broker(
        Settings(
            dev=True,
            data_dir=tmp_path / "data",  # the same keys: the dev issuer's and the broker's
            policy=EXAMPLE_POLICY,
            database_url=broker.store.url,
        )
    )
    try:
        with TestClient(create_app(broker=other)) as second:
            token = eval_token(broker)
            forms = [exchange_form(token)] * 12 + [
                exchange_form(eval_token(broker)) for _ in range(8)
            ]
            results: list[int] = [0] * len(forms)

            def go(i: int) -> None:
                target = client if i % 2 else second
                results[i] = target.post("/v1/token", data=forms[i]).status_code

            threads = [threading.Thread(target=go, args=(i,)) for i in range(len(forms))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        other.close()
    assert sorted(results[:12]) == [200] + [400] * 11
    assert results[12:] == [200] * 8
    with broker.store.read() as session:
        idx = list(session.scalars(select(EventRow.idx).order_by(EventRow.idx)))
    assert idx == list(range(len(idx)))  # dense: both brokers appended to one log
