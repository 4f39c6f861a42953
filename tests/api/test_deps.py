"""broker/api/deps.py: reading the bearer, and what is said of a bad one."""

from __future__ import annotations

from fastapi.testclient import TestClient

from broker.identity.verifier import MAX_TOKEN_BYTES
from broker.runtime import Broker
from tests.conftest import person_token


def _introspect_as(client: TestClient, bearer: str) -> tuple[int, str]:
    resp = client.post(
        "/v1/introspect", data={"token": "x"}, headers={"Authorization": f"Bearer {bearer}"}
    )
    return resp.status_code, resp.json()["error_description"]


def test_a_bearer_at_the_size_limit_is_read_one_byte_more_is_not(client: TestClient) -> None:
    # Read (and found not to be a JWT) at exactly the limit; refused unread one byte above it.
    at_limit = _introspect_as(client, "a" * MAX_TOKEN_BYTES)
    assert at_limit == (401, "bearer token rejected: not a JWT")
    above = _introspect_as(client, "a" * (MAX_TOKEN_BYTES + 1))
    assert above == (401, f"bearer token rejected: larger than {MAX_TOKEN_BYTES} bytes")


def test_only_the_bearer_scheme_is_read(client: TestClient, broker: Broker) -> None:
    token = person_token(broker, "auditor")
    # RFC 6750: "Bearer" 1*SP token, the scheme case-insensitive.
    for header in (f"Bearer {token}", f"bearer  {token}", f"BEARER {token} "):
        assert client.get("/v1/grants", headers={"Authorization": header}).status_code == 200
    for header in (f"Basic {token}", token, "Bearer ", ""):
        resp = client.get("/v1/grants", headers={"Authorization": header})
        assert (resp.status_code, resp.json()["error_description"]) == (
            401,
            "missing bearer token: send 'Authorization: Bearer <your OIDC token>'",
        ), header
