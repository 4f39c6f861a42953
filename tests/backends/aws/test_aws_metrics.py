"""The aws backend's calls in the metrics, against moto over HTTP: issue and the explained
revocation timed, and an unreachable STS counted as an issue error."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from tests.backends.aws.conftest import Moto
from tests.backends.aws.test_aws_exchange import AWS, dev_broker, eval_token
from tests.conftest import exchange_form, free_port, person_token
from tests.scrape import parse

pytestmark = pytest.mark.integration
SECONDS = "broker_backend_call_seconds_count"
ERRORS = "broker_backend_call_errors_total"


def test_aws_issue_and_revoke_are_timed(tmp_path: Path, moto: Moto) -> None:
    broker = dev_broker(tmp_path / "data")
    with TestClient(create_app(broker=broker)) as client:
        form = exchange_form(eval_token(broker), requested_token_type=AWS)
        body = client.post("/v1/token", data=form).json()
        admin = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
        revoked = client.post(
            f"/v1/grants/{body['grant_id']}/revoke", json={"reason": "x"}, headers=admin
        )
        assert revoked.json()["backend_revocation"] == "confirmed"
        m = parse(client.get("/metrics").text)
    assert m.value(SECONDS, backend="aws", operation="issue") == 1
    assert m.value(SECONDS, backend="aws", operation="revoke") == 1
    assert m.value(ERRORS, backend="aws", operation="issue") is None
    assert m.value(ERRORS, backend="aws", operation="revoke") is None
    labels = {"model": "llama-7b", "action": "evaluate", "backend": "aws", "outcome": "issued"}
    assert m.value("broker_exchanges_total", **labels) == 1


def test_an_unreachable_sts_is_an_issue_error(
    tmp_path: Path, moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    broker = dev_broker(tmp_path / "data")
    with TestClient(create_app(broker=broker)) as client:
        form = exchange_form(eval_token(broker), requested_token_type=AWS)
        assert client.post("/v1/token", data=form).status_code == 503
        m = parse(client.get("/metrics").text)
    assert m.value(ERRORS, backend="aws", operation="issue") == 1
    labels = {"model": "llama-7b", "action": "evaluate", "backend": "aws"}
    assert m.value("broker_exchanges_total", **labels, outcome="temporarily_unavailable") == 1
