"""Sinks: every format, written atomically with mode 0600 whatever the umask."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest

from broker.agent import Sink, SinkError
from broker.client import AwsCredentials, DatabaseLogin, VaultToken

NOW = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=15)
AWS = AwsCredentials(
    "g_1",
    "urn:broker:token-type:aws-credentials",
    NOW,
    LATER,
    access_key_id="ASIA1",
    secret_access_key="sk",
    session_token="st",
)
VAULT = VaultToken("g_2", "urn:broker:token-type:vault-token", NOW, LATER, token="hvs.x")
LOGIN = DatabaseLogin(
    "g_3", "urn:broker:token-type:database-credentials", NOW, LATER, username="u", password="p"
)


def test_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "cred", "json")
    old = os.umask(0)
    try:
        sink.write(VAULT)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cred").stat().st_mode) == 0o600
    assert json.loads((tmp_path / "cred").read_text())["token"] == "hvs.x"
    assert [p.name for p in tmp_path.iterdir()] == ["cred"]  # no temporary file left


def test_each_format(tmp_path: Path) -> None:
    assert Sink(tmp_path / "a", "aws-credentials").render(AWS) == (
        "[default]\naws_access_key_id = ASIA1\naws_secret_access_key = sk\naws_session_token = st\n"
    )
    assert Sink(tmp_path / "v", "vault-token").render(VAULT) == "hvs.x\n"
    assert Sink(tmp_path / "t", "token").render(VAULT) == "hvs.x\n"
    env = Sink(tmp_path / "e", "env").render(LOGIN)
    assert (
        "DB_USERNAME=u\nDB_PASSWORD=p\n" in env and "BROKER_EXPIRES_AT=2030-01-01T12:15:00Z" in env
    )


@pytest.mark.parametrize(
    ("fmt", "credential"),
    [("token", LOGIN), ("token", AWS), ("vault-token", LOGIN), ("aws-credentials", VAULT)],
)
def test_a_credential_that_does_not_fit_is_refused(
    tmp_path: Path, fmt: str, credential: object
) -> None:
    sink = Sink(tmp_path / "c", fmt)
    with pytest.raises(SinkError):
        sink.write(credential)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()
