"""Building a broker: the data dir is the broker's own."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.runtime import build_broker
from broker.settings import Settings


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing-0755"])
def test_the_data_dir_and_its_files_are_owner_only(
    tmp_path: Path, umask: int, existing: bool
) -> None:
    data = tmp_path / "data"
    if existing:
        data.mkdir()
        data.chmod(0o755)
    broker = build_broker(Settings(dev=True, data_dir=data))
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        secret = ["broker.db", "broker.db-wal", "broker.db-shm", "audit-key.pem", "audit-hmac.key"]
        modes = {name: stat.S_IMODE((data / name).stat().st_mode) for name in secret}
        assert modes == dict.fromkeys(secret, 0o600)
    finally:
        broker.close()
