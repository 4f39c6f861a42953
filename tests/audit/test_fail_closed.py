"""Fail closed: when the log cannot record the event, the exchange answers 503 and no grant or
credential exists. The store really fails (a full filesystem, a database at its size limit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import GrantRow
from tests.conftest import eval_token, exchange_form, fill_disk


def _sqlite(broker: Broker, sql: str) -> Any:
    """Run a PRAGMA on a raw connection, outside any transaction."""
    raw = broker.store.engine.raw_connection()
    try:
        return raw.driver_connection.execute(sql).fetchone()  # type: ignore[union-attr]
    finally:
        raw.close()


def _grants(broker: Broker) -> int:
    with broker.store.read() as s:
        return int(s.scalar(select(func.count()).select_from(GrantRow)) or 0)


def _assert_refused_without_grant(client: TestClient, broker: Broker) -> None:
    """One exchange: 503 temporarily_unavailable, no credential, no new grant."""
    before = _grants(broker)
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert "access_token" not in resp.text
    assert _grants(broker) == before


def test_full_filesystem_issues_nothing(small_fs: Path) -> None:
    broker = build_broker(Settings(dev=True, data_dir=small_fs / "data", policy=EXAMPLE_POLICY))
    with TestClient(create_app(broker=broker)) as client:
        assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200
        # Empty the WAL so that the next write needs new space on the disk.
        _sqlite(broker, "PRAGMA wal_checkpoint(TRUNCATE)")
        filler = small_fs / "filler"
        fill_disk(filler)
        _assert_refused_without_grant(client, broker)
        filler.unlink()
        # Space again: the broker recovers without a restart.
        assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200


def test_database_at_its_size_limit_issues_nothing(client: TestClient, broker: Broker) -> None:
    assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200
    engine = broker.store.engine
    _sqlite(broker, "PRAGMA wal_checkpoint(TRUNCATE)")
    pages = _sqlite(broker, "PRAGMA page_count")[0]

    def limit(conn: Any) -> None:
        # On every transaction, so also on the connection the event loop's group commit keeps
        # open (broker.store.loop_commit), which a "connect" hook would not reach.
        conn.exec_driver_sql(f"PRAGMA max_page_count={pages}")

    event.listen(engine, "begin", limit)
    try:
        # Rows fit in free space of existing pages for a while; once the file must grow, every
        # exchange must fail closed.
        refused = 0
        for _ in range(200):
            before = _grants(broker)
            resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
            if resp.status_code == 200:
                assert refused == 0, "issued again after the database was full"
                continue
            assert resp.status_code == 503 and "access_token" not in resp.text
            assert _grants(broker) == before
            refused += 1
            if refused == 3:
                break
        assert refused == 3
    finally:
        event.remove(engine, "begin", limit)
        engine.dispose()
