"""The KEK file: read strictly, never echoed; the data dir's own only where nothing shares the
store."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.keys.kek import create_exclusive, generate, kek_for, load_kek

SQLITE = "sqlite:///x.db"
POSTGRES = "postgresql+psycopg://u:p@127.0.0.1:5432/broker"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_generated_kek_is_32_random_bytes_in_base64(tmp_path: Path) -> None:
    text = generate()
    assert len(base64.b64decode(text, validate=True)) == 32 and text != generate()
    kek = load_kek(write(tmp_path / "kek", text + "\n"))
    assert kek.key == base64.b64decode(text) and kek.source == str(tmp_path / "kek")
    assert text not in repr(kek)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not base64 at all!", "is not base64"),
        (base64.b64encode(os.urandom(16)).decode(), "holds 16 bytes; a KEK is 32"),
        ("", "holds 0 bytes"),
    ],
)
def test_a_bad_kek_file_is_named_and_never_shown(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = write(tmp_path / "kek", content)
    with pytest.raises(ConfigError, match=problem) as raised:
        load_kek(path)
    assert str(path) in str(raised.value)
    if content:
        assert content not in str(raised.value)


def test_an_unreadable_kek_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"the KEK file {tmp_path / 'nope'} cannot be read"):
        load_kek(tmp_path / "nope")


def test_a_kek_others_may_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "kek", generate(), mode=0o640)
    with caplog.at_level(logging.WARNING, "broker.keys"):
        load_kek(path)
    assert f"the KEK file {path} is mode 640" in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, "broker.keys"):
        load_kek(path)
    assert caplog.text == ""


def test_a_single_node_gets_its_own_kek_in_the_data_dir(tmp_path: Path) -> None:
    first = kek_for(None, data_dir=tmp_path, database_url=SQLITE, dev=False)
    assert first.source == str(tmp_path / "kek")
    assert stat.S_IMODE((tmp_path / "kek").stat().st_mode) == 0o600
    again = kek_for(None, data_dir=tmp_path, database_url=SQLITE, dev=False)
    assert again.key == first.key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek"]


def test_an_explicit_kek_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        kek_for(tmp_path / "kek", data_dir=tmp_path, database_url=SQLITE, dev=False)
    assert not (tmp_path / "kek").exists()


def test_a_shared_database_needs_a_kek_file(tmp_path: Path) -> None:
    """NOTE: a per-data-dir KEK on PostgreSQL would split replicas: each its own KEK."""
    with pytest.raises(ConfigError, match="BROKER_KEK_FILE is not set"):
        kek_for(None, data_dir=tmp_path, database_url=POSTGRES, dev=False)
    assert not (tmp_path / "kek").exists()
    shared = write(tmp_path / "shared", generate())
    assert kek_for(shared, data_dir=tmp_path, database_url=POSTGRES, dev=False).key


def test_dev_on_a_shared_database_warns_and_uses_the_data_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "broker.keys"):
        kek = kek_for(None, data_dir=tmp_path, database_url=POSTGRES, dev=True)
    assert kek.source == str(tmp_path / "kek") and "another broker" in caplog.text


def test_create_exclusive_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    assert create_exclusive(path, b"one")
    assert not create_exclusive(path, b"two")
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek"]
