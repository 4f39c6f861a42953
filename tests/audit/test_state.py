"""State matches the log (issue 13): the grants, approvals and revocation tables are held
against the log, in full (``verify_state``), each maintenance round (``StateWatch``) and at
introspection. The tables are edited with plain SQL on a stopped broker's data dir."""

from __future__ import annotations

import json
import logging
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from broker.audit import state
from broker.audit.state import StateWatch, verify_state
from broker.runtime import Broker, build_broker
from tests.audit.conftest import History, bearer, serving, settings
from tests.audit.tamper import connect, event_index, execute, reactivate
from tests.conftest import eval_token, exchange_form

TRAINER = "system:serviceaccount:training:trainer"
K8S = {"kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "trainer"}}}


def findings(data_dir: Path) -> list[str]:
    broker = build_broker(settings(data_dir))
    try:
        with broker.store.read() as session:
            return [str(f) for f in verify_state(session.connection())]
    finally:
        broker.close()


def introspect(client: TestClient, broker: Broker, token: str) -> dict[str, Any]:
    resp = client.post("/v1/introspect", data={"token": token}, headers=bearer(broker, "auditor"))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def fine_tune(client: TestClient, broker: Broker, dataset: str, **form: str) -> Any:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=TRAINER, claims=K8S)
    lineage = json.dumps({"datasets": [{"uri": f"s3://datasets/approved/{dataset}"}]})
    return client.post(
        "/v1/token",
        data=exchange_form(token, action="fine-tune", lineage=lineage, **form),
    )


def approved_and_pending(data_dir: Path) -> tuple[str, str]:
    """A request approved and used by a grant, and another left pending."""
    with serving(data_dir) as (client, broker):
        used = fine_tune(client, broker, "set-1").json()["approval_id"]
        resp = client.post(
            f"/v1/approvals/{used}/approve",
            json={"reason": "looked at the data"},
            headers={"Authorization": f"Bearer {_reviewer(broker)}"},
        )
        assert resp.status_code == 200, resp.text
        assert fine_tune(client, broker, "set-1", approval_id=used).status_code == 200
        pending = fine_tune(client, broker, "set-2").json()["approval_id"]
    return used, pending


def _reviewer(broker: Broker) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub="bob@example.com", roles=["approver"])


def test_a_store_the_broker_wrote_agrees_with_its_log(history: History) -> None:
    approved_and_pending(history.data_dir)
    assert findings(history.data_dir) == []
    with serving(history.data_dir) as (_client, broker):
        assert broker.state.round() == []
        assert broker.readiness()["audit"] == "ok"


def test_a_revoked_grant_made_active_again_is_caught_everywhere(
    history: History, caplog: pytest.LogCaptureFixture
) -> None:
    reactivate(history.data_dir, history.revoked)
    revoked_at = event_index(history.data_dir, "grant.revoked")
    expected = (
        f"grant {history.revoked}: the grants table says active but the log says revoked "
        f"(index {revoked_at})"
    )
    assert expected in findings(history.data_dir)
    token = history.issued[0]["access_token"]
    with caplog.at_level(logging.CRITICAL), serving(history.data_dir) as (client, broker):
        assert broker.grants.is_active(history.revoked) is not None  # what the row claims
        assert introspect(client, broker, token) == {"active": False}
        problem = broker.readiness()["audit"]
        assert f"grant {history.revoked}: the grants table says active but the log has " in problem
        resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
        assert resp.status_code == 503
        # The maintenance round replays the suspect and keeps the verdict while it stands.
        assert expected in [str(f) for f in broker.state.round()]
    assert any(
        r.levelno == logging.CRITICAL and history.revoked in r.getMessage() for r in caplog.records
    )


def test_the_maintenance_round_finds_it_without_introspection(history: History) -> None:
    with closing(connect(history.data_dir)) as db:
        before = db.execute(
            "SELECT revoked_at, revoked_by, revoke_reason FROM grants WHERE id = ?",
            (history.revoked,),
        ).fetchone()
    reactivate(history.data_dir, history.revoked)
    with serving(history.data_dir) as (client, broker):
        broker.maintain()
        assert history.revoked in broker.readiness()["audit"]
        assert "broker_audit_state_mismatch 1.0" in client.get("/metrics").text
        # The operator puts the row back as the log says: the next round agrees again.
        with broker.store.write() as session:
            session.execute(
                text(
                    "UPDATE grants SET status = 'revoked', revoked_at = :at, revoked_by = :by, "
                    "revoke_reason = :reason WHERE id = :id"
                ),
                {"at": before[0], "by": before[1], "reason": before[2], "id": history.revoked},
            )
        assert broker.state.round() == []
        assert broker.readiness()["audit"] == "ok"


def test_an_edited_grant_names_the_field(history: History) -> None:
    grant = history.issued[1]["grant_id"]
    execute(history.data_dir, "UPDATE grants SET model = 'mistral-7b' WHERE id = ?", grant)
    [found] = findings(history.data_dir)
    assert found.startswith(
        f"grant {grant}: the grants table says model 'mistral-7b' (the log: 'llama-7b')"
    )


def test_a_grant_without_its_exchange_allowed_is_reported(history: History) -> None:
    execute(
        history.data_dir,
        "INSERT INTO grants SELECT 'g_forged', issuer, issuer_url, subject, identity_claims, "
        "subject_jti, model, action, tier, backend, rule, policy_digest, audience, reason, "
        "lineage, approval_id, issued_at, expires_at, 'active', credential_ref, NULL, NULL, "
        "NULL, NULL FROM grants WHERE id = ?",
        history.issued[1]["grant_id"],
    )
    assert findings(history.data_dir) == [
        "grant g_forged: the grants table says active but the log has no exchange.allowed for it"
    ]
    with serving(history.data_dir) as (_client, broker):
        assert [str(f) for f in broker.state.round()] == [
            "grant g_forged: the grants table says active but the log has no exchange.allowed "
            "for it"
        ]


def test_a_grant_missing_from_the_table_is_reported(history: History) -> None:
    grant = history.issued[2]["grant_id"]
    execute(history.data_dir, "DELETE FROM grants WHERE id = ?", grant)
    allowed = event_index(history.data_dir, "exchange.allowed", grant)
    assert findings(history.data_dir) == [
        f"grant {grant}: the log has it (index {allowed}) but the grants table does not"
    ]


def test_backend_revocation_jobs_are_held_against_the_log(history: History) -> None:
    grant = history.issued[1]["grant_id"]
    execute(
        history.data_dir,
        "INSERT INTO backend_revocations (grant_id, backend, status, attempts, next_attempt_at, "
        "created_at) VALUES (?, 'jwt', 'confirmed', 1, '2026-01-01', '2026-01-01')",
        grant,
    )
    execute(history.data_dir, "DELETE FROM backend_revocations WHERE grant_id = ?", history.revoked)
    found = findings(history.data_dir)
    revoked_at = event_index(history.data_dir, "grant.revoked")
    no_job = f"revoked at index {revoked_at} but no backend revocation job exists"
    assert f"grant {history.revoked}: {no_job}" in found
    assert (
        f"grant {grant}: 1 backend revocation job(s) say confirmed but the log has "
        "0 confirmation(s)" in found
    )


def test_an_event_column_that_hides_a_revocation_is_caught(history: History) -> None:
    """The indexed columns are copies of the body; only the body is a Merkle leaf."""
    revoked_at = event_index(history.data_dir, "grant.revoked")
    execute(history.data_dir, "UPDATE events SET grant_id = NULL WHERE idx = ?", revoked_at)
    reactivate(history.data_dir, history.revoked)
    found = findings(history.data_dir)
    assert (
        f"event {revoked_at}: its columns say grant_id None (the body says '{history.revoked}')"
        in found
    )
    with serving(history.data_dir) as (client, broker):
        broker.maintain()
        assert f"event {revoked_at}: its columns say grant_id None" in broker.readiness()["audit"]
        # Introspection's indexed check no longer sees the revocation, but with the verdict
        # standing nothing is reported active.
        assert introspect(client, broker, history.issued[0]["access_token"]) == {"active": False}


def test_approvals_are_held_against_the_log(history: History) -> None:
    used, pending = approved_and_pending(history.data_dir)
    execute(
        history.data_dir,
        "UPDATE approval_requests SET status = 'approved', approved_until = '2999-01-01' "
        "WHERE id = ?",
        pending,
    )
    execute(
        history.data_dir,
        "INSERT INTO approval_reviews VALUES (?, 'dev-people', 'mallory@example.com', 'approve', "
        "'ok', '2026-01-01')",
        pending,
    )
    execute(
        history.data_dir, "UPDATE approval_requests SET model = 'mistral-7b' WHERE id = ?", used
    )
    found = findings(history.data_dir)
    assert (
        f"approval {pending}: the approvals table says approved but the log says pending" in found
    )
    assert (
        f"approval {pending}: a review (approve by mallory@example.com of dev-people) is not in "
        "the log" in found
    )
    assert any(
        f.startswith(f"approval {used}: the approvals table says model 'mistral-7b'") for f in found
    )


def test_the_round_is_bounded_and_sweeps_the_older_events(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round reads the newest events and one slice of the older ones (here 2 and 2): an
    old edit is found by the sweep, a few rounds later."""
    monkeypatch.setattr(state, "WATCH_EVENTS", 2)
    edited = event_index(history.data_dir, "exchange.allowed", history.issued[2]["grant_id"])
    assert edited == 3
    execute(history.data_dir, "UPDATE events SET type = 'exchange.denied' WHERE idx = ?", edited)
    with serving(history.data_dir) as (_client, broker):
        watch = StateWatch(broker.store, broker.audit.integrity)
        with broker.store.write() as session:  # more events, so that the edit is not recent
            for n in range(4):
                broker.audit.append(session, "test.filler", broker.grants.clock(), {"n": n})
        first = watch.round()  # the newest [9, 11) and the sweep's [0, 2)
        assert not any(f.what == f"event {edited}" for f in first)
        second = watch.round()  # nothing new, and the sweep's [2, 4)
        assert [str(f) for f in second if f.what == f"event {edited}"] == [
            f"event {edited}: its columns say type 'exchange.denied' (the body says "
            "'exchange.allowed')"
        ]


def test_introspection_asks_the_events_grant_id_index(history: History) -> None:
    broker = build_broker(settings(history.data_dir))
    try:
        with broker.store.read() as session:
            conn = session.connection()
            assert "ix_events_grant_id" in {i["name"] for i in inspect(conn).get_indexes("events")}
            compiled = state._EVENTS_OF.compile(conn, compile_kwargs={"literal_binds": False})
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), ("g_x",)).all()
        assert any("USING INDEX ix_events_grant_id" in str(row) for row in plan), plan
    finally:
        broker.close()


def test_a_revocation_committed_during_introspection_is_no_disagreement(
    history: History,
) -> None:
    """Introspection read the row before the revocation committed; the log check reads the
    row again in its own snapshot, so the race is not taken for tampering."""
    broker = build_broker(settings(history.data_dir))
    try:
        with broker.store.read() as session:
            assert state.grant_ended_in_log(state.snapshot(session), history.revoked) is None
        reactivate(history.data_dir, history.revoked)
        with broker.store.read() as session:
            ended = state.grant_ended_in_log(state.snapshot(session), history.revoked)
        assert ended == (event_index(history.data_dir, "grant.revoked"), "grant.revoked")
    finally:
        broker.close()


@pytest.mark.parametrize("chunk", [1, 2, 200])
def test_the_rounds_batched_check_finds_what_the_full_check_finds(
    history: History, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The round reads the grants it holds against the log in chunks (state.check_grants);
    across chunk boundaries it finds, grant by grant and in the order asked, what the full
    check finds, and nothing for a grant that exists nowhere."""
    edited, removed = history.issued[1]["grant_id"], history.issued[2]["grant_id"]
    execute(history.data_dir, "UPDATE grants SET model = 'mistral-7b' WHERE id = ?", edited)
    execute(history.data_dir, "DELETE FROM grants WHERE id = ?", removed)
    reactivate(history.data_dir, history.revoked)
    full = [str(f) for f in findings(history.data_dir) if str(f).startswith("grant ")]
    assert len({f.split(":")[0] for f in full}) == 3  # each tampered grant, found
    monkeypatch.setattr(state, "CHECK_CHUNK", chunk)
    asked = [removed, "g_nowhere", history.revoked, edited]
    broker = build_broker(settings(history.data_dir))
    try:
        with broker.store.read() as session:
            found = [str(f) for f in state.check_grants(session.connection(), asked)]
    finally:
        broker.close()
    by_grant = {gid: [f for f in full if f.startswith(f"grant {gid}:")] for gid in asked}
    assert found == [f for gid in asked for f in by_grant[gid]]
