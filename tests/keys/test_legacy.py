"""A data dir of the version that kept keys in files: on the first start its keys move into
the store, the JWKS kids and the audit verifier key stay, and the files are no longer read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from broker.audit.checkpoint import NoteVerifier
from broker.errors import ConfigError
from broker.keys.legacy import MIGRATED
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.db import Store, sqlite_url
from broker.store.files import write_private_key, write_secret
from tests.conftest import eval_token


def settings(data_dir: Path, **extra: object) -> Settings:
    return Settings(dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, port=8080, **extra)


@dataclass
class Old:
    jwks: bytes
    verifier_key: str
    checkpoint: str
    hmac: str
    dev_kid: str


FILES = [
    "keys/jwt-current.pem",
    "keys/jwt-next.pem",
    "keys/jwt-previous.pem",
    "audit-key.pem",
    "audit-hmac.key",
    "audit-origin",
    "dev-issuer-key.pem",
]


def write_old_files(data_dir: Path, broker: Broker) -> None:
    """The files the earlier version kept, holding ``broker``'s keys."""
    keys = data_dir / "keys"
    keys.mkdir(mode=0o700)
    write_private_key(keys / "jwt-current.pem", broker.keys.current.private)
    write_private_key(keys / "jwt-next.pem", broker.keys.next.private)
    assert broker.keys.previous is not None
    write_private_key(keys / "jwt-previous.pem", broker.keys.previous.private)
    signer = broker.audit.signer
    write_private_key(data_dir / "audit-key.pem", signer._private_key)
    write_secret(data_dir / "audit-hmac.key", broker.audit._hmac_key)
    (data_dir / "audit-origin").write_text(broker.audit.origin + "\n")
    assert broker.dev_issuer is not None
    write_private_key(data_dir / "dev-issuer-key.pem", broker.dev_issuer._key)


def make_old_data_dir(data_dir: Path) -> Old:
    """A data dir as the earlier version left it: history, a signed checkpoint, an anchor,
    keys in files, a schema at 0007 without the keys table, no KEK."""
    broker = build_broker(settings(data_dir))
    try:
        new = broker.keys.new_key()
        with broker.store.write() as s:
            broker.keys.rotate(s, new)
        broker.keys.refresh()
        broker.maintain()
        with broker.store.read() as s:
            signed = broker.audit.latest_checkpoint(s)
        assert signed is not None
        old = Old(
            jwks=broker.keys.jwks_json(),
            verifier_key=broker.audit.verifier_key(),
            checkpoint=signed.note,
            hmac=broker.audit.token_hmac("a token"),
            dev_kid=broker.dev_issuer.jwks()["keys"][0]["kid"],  # type: ignore[union-attr]
        )
        write_old_files(data_dir, broker)
    finally:
        broker.close()
    store = Store(sqlite_url(data_dir))
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE keys"))
        conn.execute(text("DROP TABLE key_rings"))
        conn.execute(text("DROP TABLE leases"))  # 0009, after the keys
        conn.execute(text("DROP TABLE emergency_uses"))  # 0010
        conn.execute(text("UPDATE alembic_version SET version_num = '0007'"))
    store.close()
    (data_dir / "kek").unlink()
    return old


def test_an_upgraded_data_dir_keeps_its_keys_and_stops_reading_the_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    old = make_old_data_dir(data)
    with caplog.at_level(logging.WARNING, "broker.keys"):
        broker = build_broker(settings(data))
    try:
        assert broker.keys.jwks_json() == old.jwks
        assert broker.audit.verifier_key() == old.verifier_key
        assert broker.audit.token_hmac("a token") == old.hmac
        assert broker.dev_issuer is not None
        assert broker.dev_issuer.jwks()["keys"][0]["kid"] == old.dev_kid
        # The earlier version's checkpoint still verifies, and the anchor it left agrees.
        NoteVerifier.from_vkey(broker.audit.verifier_key()).verify(old.checkpoint.encode())
        assert broker.audit.integrity.problems() == {}
        eval_token(broker)
    finally:
        broker.close()
    for name in FILES:
        assert not (data / name).exists()
        assert (data / (name + MIGRATED)).exists()
    assert "moved the jwt keys" in caplog.text and "audit-key.pem" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "broker.keys"):
        build_broker(settings(data)).close()
    assert "hold keys in the clear from an earlier version" in caplog.text
    assert str(data / ("audit-key.pem" + MIGRATED)) in caplog.text
    # The renamed files are no longer read: without them, the keys come from the store.
    for name in FILES:
        (data / (name + MIGRATED)).unlink()
    again = build_broker(settings(data))
    try:
        assert again.keys.jwks_json() == old.jwks
        assert again.audit.verifier_key() == old.verifier_key
    finally:
        again.close()


def test_the_store_wins_over_another_data_dirs_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = build_broker(settings(tmp_path / "first"))
    jwks, vkey = first.keys.jwks_json(), first.audit.verifier_key()
    first.close()
    stranger = tmp_path / "stranger"
    stranger.mkdir(mode=0o700)
    write_private_key(stranger / "audit-key.pem", Ed25519PrivateKey.generate())
    (stranger / "audit-origin").write_text("elsewhere.example/audit\n")
    (stranger / "keys").mkdir()
    (stranger / "keys" / "jwt-current.pem").write_text("not a key at all")
    shared = {
        "database_url": sqlite_url(tmp_path / "first"),
        "kek_file": tmp_path / "first" / "kek",
    }
    with caplog.at_level(logging.WARNING, "broker.keys"):
        broker = build_broker(settings(stranger, **shared))
    try:
        assert broker.keys.jwks_json() == jwks and broker.audit.verifier_key() == vkey
    finally:
        broker.close()
    assert f"other than those in {stranger / 'audit-key.pem'}" in caplog.text
    assert f"other than those in {stranger / 'keys' / 'jwt-current.pem'}" in caplog.text
    assert (stranger / ("audit-key.pem" + MIGRATED)).exists()


def test_a_log_whose_key_was_deleted_from_the_store_refuses_to_start(tmp_path: Path) -> None:
    """NOTE: fail closed: a new key would sign on as if the log were its own."""
    data = tmp_path / "data"
    build_broker(settings(data)).close()
    store = Store(sqlite_url(data))
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM keys WHERE purpose = 'audit-signing'"))
    store.close()
    with pytest.raises(ConfigError, match="has 1 entries but no log key"):
        build_broker(settings(data))
