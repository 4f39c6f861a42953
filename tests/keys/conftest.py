"""A fresh PostgreSQL database per test, on the session's throwaway cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import Postgres


@pytest.fixture
def pg_url(postgres: Postgres) -> Iterator[str]:
    with postgres.database() as url:
        yield url
