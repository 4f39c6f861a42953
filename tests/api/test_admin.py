"""Admin API: people auth and roles, grants list/show/revoke, introspection, key rotation."""

from __future__ import annotations

import jwt
from fastapi.testclient import TestClient

from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form, person_token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _issue(client: TestClient, broker: Broker, **form: str) -> dict[str, str]:
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker), **form))
    assert resp.status_code == 200, resp.text
    body: dict[str, str] = resp.json()
    return body


def _introspect(client: TestClient, broker: Broker, token: str) -> dict[str, object]:
    resp = client.post(
        "/v1/introspect", data={"token": token}, headers=_bearer(person_token(broker, "auditor"))
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, object] = resp.json()
    return body


def test_admin_routes_need_a_person_bearer(client: TestClient, broker: Broker) -> None:
    resp = client.get("/v1/grants")
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_token"
    assert resp.headers["www-authenticate"].startswith("Bearer")
    workload = eval_token(broker)
    resp = client.get("/v1/grants", headers=_bearer(workload))
    assert resp.status_code == 401
    assert workload not in resp.text
    resp = client.get("/v1/grants", headers=_bearer("garbage"))
    assert resp.status_code == 401


def test_roles_gate_reading_and_revoking(client: TestClient, broker: Broker) -> None:
    grant_id = _issue(client, broker)["grant_id"]
    nobody = _bearer(person_token(broker, "approver"))
    assert client.get("/v1/grants", headers=nobody).status_code == 403
    auditor = _bearer(person_token(broker, "auditor"))
    assert client.get(f"/v1/grants/{grant_id}", headers=auditor).status_code == 200
    resp = client.post(f"/v1/grants/{grant_id}/revoke", json={"reason": "x"}, headers=auditor)
    assert resp.status_code == 403 and resp.json()["error"] == "insufficient_role"
    admin = _bearer(person_token(broker, "admin"))
    assert (
        client.post(
            f"/v1/grants/{grant_id}/revoke", json={"reason": "x"}, headers=admin
        ).status_code
        == 200
    )


def test_revoke_makes_introspection_inactive_and_is_final(
    client: TestClient, broker: Broker
) -> None:
    issued = _issue(client, broker)
    token, grant_id = issued["access_token"], issued["grant_id"]
    active = _introspect(client, broker, token)
    assert (
        active["active"] is True
        and active["grant_id"] == grant_id
        and active["model"] == "llama-7b"
    )

    admin = _bearer(person_token(broker, "admin", sub="bob@example.com"))
    resp = client.post(f"/v1/grants/{grant_id}/revoke", json={"reason": "leaked"}, headers=admin)
    assert resp.status_code == 200
    shown = resp.json()
    assert shown["status"] == "revoked" and shown["revoked_by"] == "dev-people:bob@example.com"
    assert shown["backend_revocation"] == "confirmed"
    assert _introspect(client, broker, token) == {"active": False}

    again = client.post(f"/v1/grants/{grant_id}/revoke", json={"reason": "again"}, headers=admin)
    assert again.status_code == 409
    # New grants for the same workload never bring the old one back.
    _issue(client, broker)
    assert client.get(f"/v1/grants/{grant_id}", headers=admin).json()["status"] == "revoked"
    assert _introspect(client, broker, token) == {"active": False}


def test_list_filters(client: TestClient, broker: Broker) -> None:
    a = _issue(client, broker)["grant_id"]
    b = _issue(client, broker)["grant_id"]
    admin = _bearer(person_token(broker, "admin"))
    client.post(f"/v1/grants/{a}/revoke", json={"reason": "x"}, headers=admin)

    def ids(**params: str) -> list[str]:
        resp = client.get("/v1/grants", params=params, headers=admin)
        assert resp.status_code == 200, resp.text
        return [g["id"] for g in resp.json()["grants"]]

    assert set(ids()) == {a, b}
    assert set(ids(model="llama-7b")) == {a, b}
    assert ids(model="mistral-7b") == []
    assert ids(subject="someone-else") == []
    assert ids(status="revoked") == [a]
    assert ids(status="active") == [b]
    assert ids(status="expired") == []
    assert client.get("/v1/grants", params={"status": "bogus"}, headers=admin).status_code == 400
    assert client.get("/v1/grants/g_missing", headers=admin).status_code == 404


def test_bulk_revocation_by_model(client: TestClient, broker: Broker) -> None:
    a = _issue(client, broker)
    b = _issue(client, broker)
    admin = _bearer(person_token(broker, "admin"))
    none = client.post(
        "/v1/revocations", json={"model": "mistral-7b", "reason": "x"}, headers=admin
    )
    assert none.json() == {"revoked": []}
    assert _introspect(client, broker, a["access_token"])["active"] is True
    resp = client.post(
        "/v1/revocations", json={"model": "llama-7b", "reason": "incident"}, headers=admin
    )
    assert sorted(resp.json()["revoked"]) == sorted([a["grant_id"], b["grant_id"]])
    assert _introspect(client, broker, a["access_token"]) == {"active": False}
    assert _introspect(client, broker, b["access_token"]) == {"active": False}
    bad = client.post(
        "/v1/revocations", json={"model": "x", "subject": "y", "reason": "r"}, headers=admin
    )
    assert bad.status_code == 400


def test_introspection_needs_a_caller_and_rejects_foreign_tokens(
    client: TestClient, broker: Broker
) -> None:
    issued = _issue(client, broker)
    assert client.post("/v1/introspect", data={"token": issued["access_token"]}).status_code == 401
    # A workload may introspect too (its own bearer token from a trusted issuer).
    resp = client.post(
        "/v1/introspect",
        data={"token": issued["access_token"]},
        headers=_bearer(eval_token(broker)),
    )
    assert resp.json()["active"] is True
    assert _introspect(client, broker, eval_token(broker)) == {"active": False}  # not a broker JWT
    assert _introspect(client, broker, "x.y.z") == {"active": False}
    huge = client.post("/v1/introspect", data={"token": "x"}, headers=_bearer("a" * 20_000))
    assert huge.status_code == 401 and "larger than" in huge.json()["error_description"]


def test_key_rotation_publishes_next_and_keeps_one_previous_key(
    client: TestClient, broker: Broker
) -> None:
    def kids() -> list[str]:
        return [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]

    old = _issue(client, broker)["access_token"]
    admin = _bearer(person_token(broker, "admin"))
    first, upcoming = kids()  # current, and next: published before it ever signs
    assert jwt.get_unverified_header(old)["kid"] == first
    assert (
        client.post("/v1/keys/rotate", headers=_bearer(person_token(broker, "auditor"))).status_code
        == 403
    )
    rotated = client.post("/v1/keys/rotate", headers=admin).json()
    assert rotated["kid"] == upcoming and rotated["retired_kid"] is None
    assert kids() == [upcoming, rotated["next_kid"], first]
    fresh = _issue(client, broker)["access_token"]
    assert jwt.get_unverified_header(fresh)["kid"] == upcoming  # the key relying parties had
    assert _introspect(client, broker, old)["active"] is True  # overlap: previous key still valid
    again = client.post("/v1/keys/rotate", headers=admin).json()
    assert again["retired_kid"] == first and first not in kids()
    assert _introspect(client, broker, old) == {"active": False}
    assert _introspect(client, broker, fresh)["active"] is True


def test_discovery_documents(client: TestClient) -> None:
    conf = client.get("/.well-known/openid-configuration").json()
    assert conf["issuer"] == "http://127.0.0.1:8080"
    assert conf["jwks_uri"] == "http://127.0.0.1:8080/.well-known/jwks.json"
    keys = client.get("/.well-known/jwks.json").json()["keys"]
    assert all("d" not in k for k in keys)  # public keys only
    assert keys[0]["alg"] == "ES256" and keys[0]["use"] == "sig"
    assert client.get("/healthz").json() == {"status": "ok"}
    # (The example policy's aws models are not ready here: no AWS credentials; see test_public.)
    checks = client.get("/readyz").json()["checks"]
    assert checks["store"] == "ok" and checks["signing_key"] == "ok"
    assert "/v1/token" in client.get("/openapi.json").json()["paths"]
