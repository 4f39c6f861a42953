"""A stopped broker's data dir with some history: the scene of issue 13's attacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.conftest import eval_token, exchange_form, person_token


def settings(data_dir: Path, **extra: Any) -> Settings:
    return Settings(
        **{"dev": True, "data_dir": data_dir, "policy": EXAMPLE_POLICY, "port": 8080, **extra}
    )


def bearer(broker: Broker, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {person_token(broker, role)}"}


@contextmanager
def serving(data_dir: Path, **extra: Any) -> Iterator[tuple[TestClient, Broker]]:
    """A broker on ``data_dir`` behind a TestClient; stopped (and its store closed) at exit."""
    broker = build_broker(settings(data_dir, **extra))
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


@dataclass
class History:
    data_dir: Path
    issued: list[dict[str, Any]]
    """The token responses of three exchanges; the first grant was revoked."""
    checkpoint: str
    """The signed note of the whole log, taken after the revocation."""

    @property
    def revoked(self) -> str:
        return str(self.issued[0]["grant_id"])


def make_history(data_dir: Path) -> History:
    with serving(data_dir) as (client, broker):
        issued = []
        for _ in range(3):
            resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
            assert resp.status_code == 200, resp.text
            issued.append(resp.json())
        revoke = client.post(
            f"/v1/grants/{issued[0]['grant_id']}/revoke",
            json={"reason": "leaked in a CI log"},
            headers=bearer(broker, "admin"),
        )
        assert revoke.status_code == 200, revoke.text
        note = client.get("/v1/audit/checkpoint", headers=bearer(broker, "auditor"))
        assert note.status_code == 200, note.text
    return History(data_dir, issued, note.text)


@pytest.fixture
def history(data_dir: Path) -> History:
    """A broker that ran, issued three grants, revoked the first, signed a checkpoint of it
    all and stopped."""
    return make_history(data_dir)
