"""Console fixtures: a dev broker's app (with the console mounted) and a client of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker


@pytest.fixture
def app(broker: Broker) -> FastAPI:
    return create_app(broker=broker)


@pytest.fixture
def web(app: FastAPI) -> Iterator[TestClient]:
    """A browser-like client of the console: keeps cookies, follows no redirects."""
    with TestClient(app, follow_redirects=False) as client:
        yield client
