"""Only a serving process (``broker serve``) freezes its start-up heap: an app built for tests
(many in one process) leaves the garbage collector as it was, or their garbage would stay."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker


def test_an_app_not_serving_leaves_the_collector_alone(broker: Broker) -> None:
    before = gc.get_freeze_count()
    with TestClient(create_app(broker=broker)) as client:
        assert client.get("/healthz").status_code == 200
    assert gc.get_freeze_count() == before
