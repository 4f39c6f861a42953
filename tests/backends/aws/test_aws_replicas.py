"""Several brokers revoking through one role at once: each has its own process lock, so only
the role lock they share through the store (:func:`broker.maintenance.role_lock`) keeps IAM's
unconditional read-modify-writes from overwriting each other's entries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.backends.aws import AwsBackend
from broker.maintenance import role_lock
from broker.store.db import Store, sqlite_url
from broker.store.lease import Leases
from tests.backends.aws.conftest import Moto, capturing_session, load, make_grant
from tests.backends.aws.test_aws_revocation import grant_ids_denied

pytestmark = pytest.mark.integration  # moto over HTTP

REPLICAS = 3


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[Store]]:
    """One engine per replica on one database (as separate processes would have)."""
    stores = [Store(sqlite_url(tmp_path)) for _ in range(REPLICAS)]
    stores[0].migrate()
    yield stores
    for store in stores:
        store.close()


def test_revocations_spread_over_replicas_lose_no_entry(moto: Moto, stores: list[Store]) -> None:
    replicas = [
        AwsBackend(load(), session=capturing_session(moto), role_lock=role_lock(Leases(store)))
        for store in stores
    ]
    revoked = [make_grant(id=f"g_{n:024x}") for n in range(12)]
    start = threading.Barrier(len(revoked))

    def revoke(n: int) -> bool:
        grant: Any = revoked[n]
        start.wait()
        return replicas[n % REPLICAS].revoke(grant, grant.id)

    with ThreadPoolExecutor(max_workers=len(revoked)) as pool:
        assert all(pool.map(revoke, range(len(revoked))))
    assert grant_ids_denied(moto.revocation_policy()) == {g.id for g in revoked}
