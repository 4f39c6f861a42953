"""``broker keys kek generate|rotate``: a fresh KEK, and every key resealed with a new one."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.cli.test_main import run


def test_generate_prints_a_fresh_kek(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keys", "kek", "generate")
    assert code == 0 and len(base64.b64decode(out.strip(), validate=True)) == 32
    assert run(capsys, "keys", "kek", "generate")[1] != out


def test_generate_writes_a_new_owner_only_file_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kek"
    code, out, _ = run(capsys, "keys", "kek", "generate", "--out", str(path))
    assert code == 0 and str(path) in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = path.read_bytes()
    assert len(base64.b64decode(written.strip(), validate=True)) == 32
    code, _, err = run(capsys, "keys", "kek", "generate", "--out", str(path))
    assert code == 2 and "exists" in err and path.read_bytes() == written


def test_rotate_reseals_every_key_so_only_the_new_kek_opens_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    broker = build_broker(Settings(dev=True, data_dir=data, policy=EXAMPLE_POLICY))
    jwks, vkey = broker.keys.jwks_json(), broker.audit.verifier_key()
    broker.close()
    new = tmp_path / "new-kek"
    assert run(capsys, "keys", "kek", "generate", "--out", str(new))[0] == 0
    code, out, _ = run(capsys, "keys", "kek", "rotate", "--new", str(new), "--data-dir", str(data))
    assert code == 0 and "resealed 5 keys" in out  # jwt current+next, audit key+hmac, dev
    with pytest.raises(ConfigError, match=f"does not open with the KEK {data / 'kek'}"):
        build_broker(Settings(dev=True, data_dir=data, policy=EXAMPLE_POLICY))
    again = build_broker(Settings(dev=True, data_dir=data, policy=EXAMPLE_POLICY, kek_file=new))
    try:
        assert again.keys.jwks_json() == jwks and again.audit.verifier_key() == vkey
    finally:
        again.close()
    code, _, err = run(
        capsys,
        "keys",
        "kek",
        "rotate",
        "--new",
        str(new),
        "--kek-file",
        str(new),
        "--data-dir",
        str(data),
    )
    assert code == 2 and "already" in err
