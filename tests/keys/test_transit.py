"""The KEK wrapped by a real OpenBao's transit engine: made without being shown, unwrapped at
start-up, and no start-up (and no new key) when OpenBao refuses to unwrap it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.cli.main import main
from broker.errors import ConfigError
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.db import Store, sqlite_url
from broker.store.tables import KeyRow
from tests.servers import OpenBao

pytestmark = pytest.mark.integration
KEY = "broker-kek"


@dataclass
class Transit:
    url: str
    mount: str
    token: str
    """A token that may only make and unwrap data keys with KEY."""


@pytest.fixture
def transit(openbao_server: OpenBao) -> Iterator[Transit]:
    root = openbao_server.root
    mount = f"transit-{secrets.token_hex(4)}"
    root.sys.enable_secrets_engine("transit", path=mount)
    root.secrets.transit.create_key(KEY, mount_point=mount)
    name = f"kek-{mount}"
    root.sys.create_or_update_policy(
        name,
        f'path "{mount}/decrypt/{KEY}" {{ capabilities = ["update"] }}\n'
        f'path "{mount}/datakey/wrapped/{KEY}" {{ capabilities = ["update"] }}\n',
    )
    token = root.auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    try:
        yield Transit(openbao_server.url, mount, token)
    finally:
        root.sys.disable_secrets_engine(mount)
        root.sys.delete_policy(name)


def settings(
    transit: Transit, data_dir: Path, kek_file: Path, token: str | None = None
) -> Settings:
    return Settings(
        data_dir=data_dir,
        policy=EXAMPLE_POLICY,
        dev=True,
        kek_file=kek_file,
        kek_transit_key=KEY,
        kek_transit_mount=transit.mount,
        vault_addr=transit.url,
        vault_token=token or transit.token,
    )


def wrapped(transit: Transit, path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VAULT_ADDR", transit.url)
    monkeypatch.setenv("VAULT_TOKEN", transit.token)
    argv = ["keys", "kek", "generate", "--transit-key", KEY, "--transit-mount", transit.mount]
    assert main([*argv, "--out", str(path)]) == 0
    return path


def test_a_wrapped_kek_is_unwrapped_at_start_up(
    transit: Transit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kek = wrapped(transit, tmp_path / "kek.wrapped", monkeypatch)
    assert kek.read_text().startswith("vault:v1:")
    broker = build_broker(settings(transit, tmp_path / "data", kek))
    jwks = broker.keys.jwks_json()
    broker.close()
    assert not (tmp_path / "data" / "kek").exists()  # no KEK of its own was made
    again = build_broker(settings(transit, tmp_path / "data", kek))
    try:
        assert again.keys.jwks_json() == jwks
    finally:
        again.close()
    # The offline commands unwrap it the same way.
    monkeypatch.setenv("BROKER_KEK_TRANSIT_KEY", KEY)
    monkeypatch.setenv("BROKER_KEK_TRANSIT_MOUNT", transit.mount)
    argv = ["audit", "verify", "--data-dir", str(tmp_path / "data"), "--kek-file", str(kek)]
    assert main(argv) == 0


def test_no_start_up_when_openbao_refuses_to_unwrap(
    transit: Transit, openbao_server: OpenBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kek = wrapped(transit, tmp_path / "kek.wrapped", monkeypatch)
    build_broker(settings(transit, tmp_path / "data", kek)).close()
    store = Store(sqlite_url(tmp_path / "data"))
    with store.read() as s:
        before = s.execute(select(KeyRow.kid, KeyRow.sealed)).all()
    nobody = openbao_server.root.auth.token.create(policies=["default"], ttl="1h")["auth"]
    with pytest.raises(ConfigError) as raised:
        build_broker(settings(transit, tmp_path / "data", kek, token=nobody["client_token"]))
    message = str(raised.value)
    assert f"cannot unwrap the KEK in {kek} with the transit key '{KEY}'" in message
    assert kek.read_text().strip() not in message
    with store.read() as s:
        assert s.execute(select(KeyRow.kid, KeyRow.sealed)).all() == before
    store.close()


def test_a_plain_kek_file_is_refused_when_transit_is_asked_for(
    transit: Transit, tmp_path: Path
) -> None:
    plain = tmp_path / "kek"
    assert main(["keys", "kek", "generate", "--out", str(plain)]) == 0
    with pytest.raises(ConfigError, match="is not a transit ciphertext"):
        build_broker(settings(transit, tmp_path / "data", plain))
