"""The anchor (issue 13): a database writer alone cannot make the broker vouch for a rewritten
history. The store is rewritten exactly as the issue reproduced it, on a stopped broker."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import generate_latest
from sqlalchemy import func, select

from broker.audit.anchor import ANCHOR_FILE, AnchorError, AnchorFile
from broker.audit.checkpoint import Checkpoint, NoteSigner, NoteVerifier
from broker.audit.log import AuditIntegrityError
from broker.runtime import Broker, build_broker
from broker.store.tables import CheckpointRow, GrantRow
from tests.audit.conftest import History, bearer, serving, settings
from tests.audit.tamper import event_index, rewrite_history
from tests.conftest import eval_token, exchange_form

ORIGIN = "test.example/audit"


def forge(history: History) -> None:
    """The attack of issue 13: checkpoints deleted, a grant's subject and a revocation's reason
    rewritten, the tree recomputed to match."""
    allowed = event_index(history.data_dir, "exchange.allowed", history.issued[1]["grant_id"])
    revoked = event_index(history.data_dir, "grant.revoked")

    def subject(event: dict[str, Any]) -> None:
        event["identity"]["subject"] = "repo:acme/innocent:ref:refs/heads/main"

    def reason(event: dict[str, Any]) -> None:
        event["reason"] = "routine rotation"

    rewrite_history(history.data_dir, {allowed: subject, revoked: reason})


def sign(broker: Broker) -> str:
    with broker.store.write() as session:
        return broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC)).note


def checkpoints(broker: Broker) -> int:
    with broker.store.read() as session:
        return int(session.scalar(select(func.count()).select_from(CheckpointRow)) or 0)


def metric(broker: Broker, name: str) -> float:
    for line in generate_latest(broker.metrics.registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_signing_anchors_the_checkpoint_in_a_private_file(history: History) -> None:
    anchor = history.data_dir / ANCHOR_FILE
    assert anchor.read_text() == history.checkpoint
    assert stat.S_IMODE(anchor.stat().st_mode) == 0o600
    with serving(history.data_dir) as (client, broker):
        assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200
        newer = sign(broker)
        assert anchor.read_text() == newer != history.checkpoint
        verifier = NoteVerifier.from_vkey(broker.audit.verifier_key())
        assert metric(broker, "broker_audit_anchor_size") == verifier.verify(newer.encode()).size


def test_the_broker_refuses_to_sign_over_a_rewritten_history(
    history: History, caplog: pytest.LogCaptureFixture
) -> None:
    forge(history)
    with caplog.at_level(logging.CRITICAL), serving(history.data_dir) as (client, broker):
        with pytest.raises(AuditIntegrityError, match="history was rewritten"):
            sign(broker)
        assert checkpoints(broker) == 0  # nothing was signed over the forged entries
        assert (history.data_dir / ANCHOR_FILE).read_text() == history.checkpoint
        ready = client.get("/readyz")
        assert ready.status_code == 503
        described = ready.json()["error_description"]
        assert "audit: the anchor (audit-anchor) holds checkpoint 6" in described
        assert ready.json()["checks"]["store"] == "ok"
        assert metric(broker, "broker_audit_anchor_mismatch") == 1
        served = client.get("/v1/audit/checkpoint", headers=bearer(broker, "auditor"))
        assert served.status_code == 500 and served.json()["error"] == "audit_integrity"
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical and "history was rewritten" in critical[0].getMessage()


def test_exchanges_fail_closed_while_the_store_disagrees(history: History) -> None:
    forge(history)
    with serving(history.data_dir) as (client, broker):
        with broker.store.read() as session:
            grants = session.scalar(select(func.count()).select_from(GrantRow))
        resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "temporarily_unavailable"
        assert "integrity" in resp.json()["error_description"]
        assert "anchor" not in resp.json()["error_description"]  # details for operators only
        with broker.store.read() as session:
            assert session.scalar(select(func.count()).select_from(GrantRow)) == grants


def test_without_the_anchor_the_same_forgery_would_be_signed(history: History) -> None:
    """What the anchor adds: the same store, with the anchor gone (which needs the data dir,
    not only the database), is signed; the trust model says who must hold what."""
    forge(history)
    (history.data_dir / ANCHOR_FILE).unlink()
    with serving(history.data_dir) as (client, broker):
        sign(broker)
        assert checkpoints(broker) == 1
        assert client.get("/readyz").json()["checks"]["audit"] == "ok"


def test_a_rolled_back_store_is_refused(history: History, tmp_path: Path) -> None:
    backup = tmp_path / "broker.db.bak"
    shutil.copy(history.data_dir / "broker.db", backup)
    with serving(history.data_dir) as (client, broker):
        for _ in range(2):
            client.post("/v1/token", data=exchange_form(eval_token(broker)))
        sign(broker)
    for suffix in ("-wal", "-shm"):
        (history.data_dir / f"broker.db{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, history.data_dir / "broker.db")  # the database as it was, checkpoints too
    with serving(history.data_dir) as (client, broker):
        problem = broker.audit.integrity.problem("anchor")
        assert problem is not None and "truncated or rolled back" in problem
        with pytest.raises(AuditIntegrityError, match="rolled back"):
            sign(broker)
        assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 503


def test_the_verdict_stands_until_the_store_agrees_again(history: History, tmp_path: Path) -> None:
    original = tmp_path / "broker.db.orig"
    shutil.copy(history.data_dir / "broker.db", original)
    forge(history)
    broker = build_broker(settings(history.data_dir))
    try:
        assert broker.readiness()["audit"] != "ok"
        broker.maintain()  # the round goes on (and reports again) despite the refusal
        assert broker.readiness()["audit"] != "ok"
        # The operator restores the genuine database: the next signing agrees.
        broker.store.close()
        for suffix in ("-wal", "-shm"):
            (history.data_dir / f"broker.db{suffix}").unlink(missing_ok=True)
        shutil.copy(original, history.data_dir / "broker.db")
        with broker.store.write() as session:
            broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
        assert broker.audit.integrity.problem("anchor") is None
        # The round had also found the forged revocation reason against the grants table;
        # that verdict stands until a round finds the tables agree again.
        assert broker.audit.integrity.problem("state") is not None
        broker.state.round()
        assert broker.readiness()["audit"] == "ok"
        assert metric(broker, "broker_audit_anchor_mismatch") == 0
    finally:
        broker.close()


def test_an_anchor_that_does_not_verify_fails_the_check(history: History) -> None:
    other = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    (history.data_dir / ANCHOR_FILE).write_bytes(other.sign(Checkpoint(ORIGIN, 1, b"\0" * 32)))
    with serving(history.data_dir) as (_client, broker):
        problem = broker.audit.integrity.problem("anchor")
        assert problem is not None and "does not verify" in problem
        with pytest.raises(AuditIntegrityError, match="does not verify"):
            sign(broker)


def test_exchanges_do_not_read_the_anchor(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path reads the cached verdict only: no file, no query for the anchor."""
    with serving(history.data_dir) as (client, broker):
        reads: list[int] = []
        real = AnchorFile.load

        def counted(self: AnchorFile) -> Checkpoint | None:
            reads.append(1)
            return real(self)

        monkeypatch.setattr(AnchorFile, "load", counted)
        for _ in range(3):
            resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
            assert resp.status_code == 200
        assert reads == []


def test_the_anchor_only_moves_forward(tmp_path: Path) -> None:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    anchor = AnchorFile(tmp_path / ANCHOR_FILE, NoteVerifier.from_vkey(signer.verifier_key()))
    assert anchor.load() is None
    five = signer.sign(Checkpoint(ORIGIN, 5, b"\x05" * 32))
    three = signer.sign(Checkpoint(ORIGIN, 3, b"\x03" * 32))
    assert anchor.advance(five) is True
    assert anchor.advance(three) is False  # another process anchored a newer one meanwhile
    loaded = anchor.load()
    assert loaded is not None and loaded.size == 5
    stranger = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    with pytest.raises(AnchorError, match="does not verify"):
        anchor.advance(stranger.sign(Checkpoint(ORIGIN, 9, b"\x09" * 32)))
    assert anchor.load() == loaded


def test_a_checkpoint_whose_transaction_rolls_back_is_not_anchored(history: History) -> None:
    """The anchor moves only after the commit: an anchor ahead of its store would read as a
    rollback at the next start."""
    with serving(history.data_dir) as (client, broker):
        client.post("/v1/token", data=exchange_form(eval_token(broker)))
        with pytest.raises(RuntimeError), broker.store.write() as session:
            broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
            raise RuntimeError("the commit never happens")
        assert (history.data_dir / ANCHOR_FILE).read_text() == history.checkpoint
        sign(broker)
    with serving(history.data_dir) as (_client, broker):
        assert broker.audit.integrity.problems() == {}
