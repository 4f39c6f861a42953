"""``POST /v1/token``'s own form reading (broker/api/token.py) where mutmut found it untested:
a ``requested_ttl`` that is not a number, or zero, is a 400 naming the field."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form


@pytest.mark.parametrize("ttl", ["soon", "1h", "0"])
def test_requested_ttl_must_be_a_positive_number_of_seconds(
    client: TestClient, broker: Broker, ttl: str
) -> None:
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker), requested_ttl=ttl))
    assert (resp.status_code, resp.json()) == (
        400,
        {
            "error": "invalid_request",
            "error_description": "requested_ttl: expected a positive whole number of at most 9 "
            "digits 0-9",
        },
    )
