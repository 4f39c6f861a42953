"""The break-glass cap holds across replicas: two brokers on one PostgreSQL database, racing
emergency uses by one identity, issue exactly ``max_per_identity`` of them (the count is taken
behind the log's write lock, in the transaction that records the use)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.conftest import exchange_form
from tests.keys.support import kek_file
from tests.servers import Postgres
from tests.vendor import VENDOR_SUB, vendor_policy

pytestmark = pytest.mark.integration


@pytest.fixture
def replicas(postgres: Postgres, tmp_path: Path) -> Iterator[list[tuple[TestClient, Broker]]]:
    policy = vendor_policy(tmp_path)
    kek = kek_file(tmp_path / "kek")  # the replicas share the KEK (docs/deployment.md)
    with postgres.database() as url, contextlib.ExitStack() as stack:
        brokers = []
        for n in range(2):
            settings = Settings(
                dev=True,
                data_dir=tmp_path / f"replica-{n}",
                policy=policy,
                database_url=url,
                kek_file=kek,
            )
            broker = build_broker(settings)
            stack.callback(broker.close)
            brokers.append(broker)
        clients = [stack.enter_context(TestClient(create_app(broker=b))) for b in brokers]
        yield list(zip(clients, brokers, strict=True))


def test_racing_replicas_issue_exactly_the_cap(
    replicas: list[tuple[TestClient, Broker]],
) -> None:
    forms = []
    for n in range(6):
        client, broker = replicas[n % 2]
        assert broker.dev_issuer is not None
        token = broker.dev_issuer.mint(sub=VENDOR_SUB)
        form = exchange_form(
            token, model="vendor-llm", action="hotfix", emergency="true", reason="INC-1"
        )
        forms.append((client, form))
    results: list[tuple[int, str]] = [(0, "")] * len(forms)
    start = threading.Barrier(len(forms))

    def go(i: int) -> None:
        client, form = forms[i]
        start.wait()
        resp = client.post("/v1/token", data=form)
        results[i] = (resp.status_code, resp.text)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(forms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 200, 403, 403, 403, 403], results
    assert all("used its 2 emergency use(s)" in body for status, body in results if status == 403)
