"""Tamper tests: `broker audit verify` catches each rewrite and names where; exports verify
offline with only the files and the public key."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from broker.audit.checkpoint import Checkpoint, NoteSigner
from broker.audit.log import AuditLog
from broker.cli.keys import key_store
from broker.cli.main import main
from broker.runtime import Broker
from broker.store.tables import CheckpointRow, EventRow, LogHeadRow
from tests.audit.conftest import History
from tests.audit.tamper import event_index, execute, reactivate, rewrite_history
from tests.conftest import eval_token, exchange_form


@pytest.fixture
def logged(client: TestClient, broker: Broker) -> Broker:
    """A log of 1 + 12 events (policy.loaded and exchanges) with checkpoints at 7 and 13."""
    for n in range(12):
        action = "evaluate" if n % 3 else "nope"
        client.post("/v1/token", data=exchange_form(eval_token(broker), action=action))
        if n == 5:
            with broker.store.write() as s:
                assert broker.audit.sign_checkpoint(s, dt.datetime.now(dt.UTC)).size == 7
    with broker.store.write() as s:
        assert broker.audit.sign_checkpoint(s, dt.datetime.now(dt.UTC)).size == 13
    return broker


def verify(
    capsys: pytest.CaptureFixture[str], data_dir: Path, *extra: str
) -> tuple[int, dict[str, object]]:
    code = main(["audit", "verify", "--data-dir", str(data_dir), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_an_untouched_log_verifies(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = verify(capsys, data_dir)
    assert (code, report["ok"], report["size"], report["checkpoints"]) == (0, True, 13, 2)


def test_one_changed_byte_is_found(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with logged.store.write() as s:
        row = s.get(EventRow, 4)
        assert row is not None
        row.body = row.body.replace(b'"v":1', b'"v":2', 1)
    code, report = verify(capsys, data_dir)
    assert code == 1 and report["first_bad_index"] == 4
    assert any("signed checkpoint of size 7" in p for p in report["problems"])  # type: ignore[union-attr]


def test_a_deleted_event_is_found(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with logged.store.write() as s:
        s.execute(delete(EventRow).where(EventRow.idx == 9))
    code, report = verify(capsys, data_dir)
    assert code == 1 and report["first_bad_index"] == 9
    assert "missing" in str(report["problems"])


def test_swapped_events_are_found(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with logged.store.write() as s:
        a, b = s.get(EventRow, 2), s.get(EventRow, 3)
        assert a is not None and b is not None
        a.body, b.body = b.body, a.body
    code, report = verify(capsys, data_dir)
    assert code == 1 and report["first_bad_index"] == 2
    assert "moved or swapped" in str(report["problems"])


def test_truncation_is_found(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with logged.store.write() as s:
        s.execute(delete(EventRow).where(EventRow.idx >= 10))
        s.execute(update(LogHeadRow).values(size=10))
    code, report = verify(capsys, data_dir)
    assert code == 1 and report["first_bad_index"] == 10
    assert "truncated" in str(report["problems"])


def test_a_replaced_checkpoint_is_found(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forger = NoteSigner(logged.audit.origin, Ed25519PrivateKey.generate())
    with logged.store.write() as s:
        row = s.scalars(select(CheckpointRow).where(CheckpointRow.size == 13)).one()
        row.note = forger.sign(Checkpoint(logged.audit.origin, 13, b"\x01" * 32)).decode()
    code, report = verify(capsys, data_dir)
    assert code == 1 and "does not verify" in str(report["problems"])


def test_verify_against_a_key_from_elsewhere(
    logged: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = NoteSigner(logged.audit.origin, Ed25519PrivateKey.generate()).verifier_key()
    code, report = verify(capsys, data_dir, "--key", other)
    assert (code, report["ok"]) == (1, False)
    code, report = verify(capsys, data_dir, "--key", logged.audit.verifier_key())
    assert (code, report["ok"]) == (0, True)


def test_export_verifies_offline(
    logged: Broker, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    assert (
        main(["audit", "export", str(out), "--since", "8", "--data-dir", str(data_dir), "--json"])
        == 0
    )
    exported = json.loads(capsys.readouterr().out)
    assert (exported["since"], exported["size"]) == (8, 13)
    key = logged.audit.verifier_key()
    offline = tmp_path / "elsewhere"
    shutil.copytree(out, offline)  # nothing but the files
    assert main(["audit", "verify", "--export", str(offline), "--key", key]) == 0
    assert "ok" in capsys.readouterr().out
    manifest = json.loads((offline / "proof.json").read_text())
    assert manifest["previous"] is not None  # the checkpoint at 7 links this export to history

    lines = (offline / "entries.jsonl").read_text().splitlines()
    item = json.loads(lines[2])
    item["event"]["model"] = "forged"
    lines[2] = json.dumps(item)
    (offline / "entries.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", "--export", str(offline), "--key", key]) == 1
    assert "index 10" in capsys.readouterr().out

    other = NoteSigner(logged.audit.origin, Ed25519PrivateKey.generate()).verifier_key()
    assert main(["audit", "verify", "--export", str(out), "--key", other]) == 1
    assert main(["audit", "verify", "--export", str(out)]) == 2  # a key is required


def test_audit_proof_for_a_grant(
    logged: Broker, client: TestClient, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grant_id = client.post("/v1/token", data=exchange_form(eval_token(logged))).json()["grant_id"]
    assert main(["audit", "proof", grant_id, "--data-dir", str(data_dir), "--json"]) == 0
    proof = json.loads(capsys.readouterr().out)
    assert proof["verified"] is True and proof["size"] == 14 and proof["index"] == 13
    assert main(["audit", "proof", "g_nope", "--data-dir", str(data_dir)]) == 2


# --- issue 13: verification against checkpoints held outside the store ---------------------------


def _forge_stopped(history: History) -> None:
    """Issue 13's attack on the stopped broker: checkpoints deleted, a grant's subject and a
    revocation's reason rewritten, the tree recomputed."""
    allowed = event_index(history.data_dir, "exchange.allowed", history.issued[1]["grant_id"])
    revoked = event_index(history.data_dir, "grant.revoked")

    def subject(event: dict[str, Any]) -> None:
        event["identity"]["subject"] = "repo:acme/innocent:ref:refs/heads/main"

    def reason(event: dict[str, Any]) -> None:
        event["reason"] = "routine rotation"

    rewrite_history(history.data_dir, {allowed: subject, revoked: reason})


def test_an_untouched_store_is_consistent_with_the_checkpoints_held_outside(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = tmp_path / "auditor-copy"
    held.write_text(history.checkpoint)
    code, report = verify(capsys, history.data_dir, "--trusted-checkpoint", str(held))
    assert (code, report["ok"]) == (0, True), report["problems"]
    assert report["trusted"] == [
        {"label": "the broker's anchor (audit-anchor)", "size": 6},
        {"label": f"the trusted checkpoint {held}", "size": 6},
    ]
    assert main(["audit", "verify", "--data-dir", str(history.data_dir)]) == 0
    said = capsys.readouterr().out
    assert "consistent with the broker's anchor" in said and "tables agree with the log" in said


def test_the_anchor_alone_fails_the_forged_store(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13: `broker audit verify` exited 0 on this store ("no signed checkpoint covers
    them yet")."""
    _forge_stopped(history)
    code, report = verify(capsys, history.data_dir)
    assert code == 1
    assert report["problems"][0] == (  # type: ignore[index]
        "entries 0..5 do not hash to the broker's anchor (audit-anchor) (size 6): history was "
        "rewritten before index 6"
    )


def test_a_trusted_checkpoint_fails_the_forged_store_without_the_anchor(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever also holds the data dir removed the anchor; an auditor's copy still tells."""
    held = tmp_path / "auditor-copy"
    held.write_text(history.checkpoint)
    _forge_stopped(history)
    (history.data_dir / "audit-anchor").unlink()
    code, report = verify(capsys, history.data_dir, "--trusted-checkpoint", str(held))
    assert code == 1
    assert report["problems"][0] == (  # type: ignore[index]
        f"entries 0..5 do not hash to the trusted checkpoint {held} (size 6): history was "
        "rewritten before index 6"
    )
    # Without it, only the state tables (which the writer left alone) still tell.
    code, report = verify(capsys, history.data_dir)
    assert code == 1 and report["trusted"] == []
    assert all(str(p).startswith("grant ") for p in report["problems"])  # type: ignore[union-attr]


def test_a_trusted_checkpoint_beyond_the_store_is_a_rollback(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    execute(history.data_dir, "DELETE FROM events WHERE idx >= 4")
    execute(history.data_dir, "DELETE FROM tree_nodes WHERE idx * (1 << level) >= 4")
    execute(history.data_dir, "DELETE FROM checkpoints")
    execute(history.data_dir, "UPDATE log_head SET size = 4")
    (history.data_dir / "audit-anchor").unlink()
    held = tmp_path / "auditor-copy"
    held.write_text(history.checkpoint)
    code, report = verify(capsys, history.data_dir, "--trusted-checkpoint", str(held))
    assert code == 1 and report["first_bad_index"] == 4
    assert (
        f"index 4: the trusted checkpoint {held} covers 6 entries but the store has 4: the log "
        "was truncated or rolled back" in report["problems"]  # type: ignore[operator]
    )


def test_a_trusted_checkpoint_that_does_not_verify_is_named(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = key_store(history.data_dir, None, None)  # the data dir's store and KEK, read only
    origin = AuditLog.from_store(keys, data_dir=None).origin
    keys.store.close()
    forged = tmp_path / "forged"
    signer = NoteSigner(origin, Ed25519PrivateKey.generate())
    forged.write_bytes(signer.sign(Checkpoint(origin, 6, b"\x07" * 32)))
    code, report = verify(capsys, history.data_dir, "--trusted-checkpoint", str(forged))
    assert code == 1
    assert str(report["problems"]).startswith(f"['the trusted checkpoint {forged} does not verify")
    code = main(
        ["audit", "verify", "--data-dir", str(history.data_dir), "--trusted-checkpoint", "nope"]
    )
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_verify_holds_the_state_tables_against_the_log(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    reactivate(history.data_dir, history.revoked)
    code, report = verify(capsys, history.data_dir)
    assert code == 1
    revoked_at = event_index(history.data_dir, "grant.revoked")
    assert (
        f"grant {history.revoked}: the grants table says active but the log says revoked "
        f"(index {revoked_at})" in report["problems"]  # type: ignore[operator]
    )
    # Opting out of the state check is explicit, and then the log alone verifies.
    code, report = verify(capsys, history.data_dir, "--log-only")
    assert (code, report["ok"]) == (0, True)
