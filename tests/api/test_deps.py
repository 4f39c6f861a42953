"""broker/api/deps.py: what `authenticate_any` (introspection's caller) says of a bad bearer."""

from __future__ import annotations

from fastapi.testclient import TestClient

from broker.identity.verifier import MAX_TOKEN_BYTES


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
