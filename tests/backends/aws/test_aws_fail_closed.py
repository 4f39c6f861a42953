"""Fail closed on an AWS exchange: when its activation cannot be recorded (a SQLite trigger on
the broker's file aborts every insert into ``events``), the answer is 503 without credentials,
the grant is ``failed``, and the STS session that was issued is denied in IAM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.backends.aws import AwsBackend
from broker.backends.base import BackendRegistry, Credential
from broker.grants.model import Grant
from broker.runtime import Broker
from tests.backends.aws.conftest import Moto, capturing_session
from tests.backends.aws.test_aws_exchange import AWS, dev_broker, eval_token
from tests.conftest import exchange_form
from tests.faults import grant_statuses, inserts_blocked

pytestmark = pytest.mark.integration


class RecordingAws(AwsBackend):
    """The real aws backend, keeping what it issued (the answer will not show it)."""

    issued: list[Credential]

    def issue(self, grant: Grant) -> Credential:
        credential = super().issue(grant)
        self.issued.append(credential)
        return credential


@pytest.fixture
def served(moto: Moto, tmp_path: Path) -> Iterator[tuple[TestClient, Broker, RecordingAws]]:
    broker = dev_broker(tmp_path / "data")
    aws = RecordingAws(broker.policy, session=capturing_session(moto))
    aws.issued = []
    backends = {b.name: b for b in broker.grants.backends.all()}
    broker.grants.backends = BackendRegistry({**backends, "aws": aws})
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker, aws


def test_activation_that_cannot_be_recorded_denies_the_session(
    served: tuple[TestClient, Broker, RecordingAws], moto: Moto
) -> None:
    client, broker, aws = served
    with inserts_blocked(broker, "events"):
        resp = client.post(
            "/v1/token", data=exchange_form(eval_token(broker), requested_token_type=AWS)
        )
    assert resp.status_code == 503, resp.text
    assert "access_token" not in resp.text and "aws_credentials" not in resp.text
    [credential] = aws.issued
    assert list(grant_statuses(broker).values()) == ["failed"]
    assert not moto.credential_works(dict(credential.extra["aws_credentials"]))
