"""Building a broker (the data dir is the broker's own) and its maintenance round."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from broker.runtime import Broker, build_broker
from broker.settings import Settings
from broker.store.db import WAL_SIZE_LIMIT
from broker.store.tables import UsedTokenRow

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


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
        secret = ["broker.db", "broker.db-wal", "broker.db-shm", "broker.db-writer.lock", "kek"]
        modes = {name: stat.S_IMODE((data / name).stat().st_mode) for name in secret}
        assert modes == dict.fromkeys(secret, 0o600)
    finally:
        broker.close()


def test_maintenance_truncates_the_wal(broker: Broker, data_dir: Path) -> None:
    wal = data_dir / "broker.db-wal"
    with broker.store.write() as s:
        s.execute(
            insert(UsedTokenRow),
            [
                {"issuer": "i", "jti": f"{n:05d}" + "x" * 999, "expires_at": NOW}
                for n in range(3000)
            ],
        )
    assert wal.stat().st_size > WAL_SIZE_LIMIT
    broker.maintain()
    assert wal.stat().st_size == 0
    with broker.store.read() as s:
        assert s.execute(select(func.count()).select_from(UsedTokenRow)).scalar_one() == 3000
