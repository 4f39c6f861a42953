"""POST /v1/token: the contract's fields, errors and the grant + event it records."""

from __future__ import annotations

import json
import threading

import jwt
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.runtime import Broker
from broker.store.tables import EventRow, GrantRow
from tests.conftest import EVAL_SUB, eval_token, exchange_form


def _events(broker: Broker) -> list[dict[str, object]]:
    """Exchange events, in log order (the log also holds e.g. policy.loaded)."""
    with broker.store.read() as s:
        rows = s.scalars(select(EventRow).order_by(EventRow.idx))
        return [
            e for e in (json.loads(r.body) for r in rows) if str(e["type"]).startswith("exchange.")
        ]


def _grants(broker: Broker) -> list[GrantRow]:
    with broker.store.read() as s:
        return list(s.scalars(select(GrantRow)))


def test_exchange_issues_a_model_scoped_broker_jwt(client: TestClient, broker: Broker) -> None:
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker), reason="nightly"))
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "evaluate"
    assert body["expires_in"] == 3600  # evaluate's max_ttl
    jwks = jwt.PyJWKSet.from_dict(client.get("/.well-known/jwks.json").json())
    kid = jwt.get_unverified_header(body["access_token"])["kid"]
    claims = jwt.decode(
        body["access_token"],
        jwks[kid].key,
        algorithms=["ES256"],
        audience="model:llama-7b",
        issuer="http://127.0.0.1:8080",
    )
    assert claims["sub"] == EVAL_SUB
    assert (claims["model"], claims["action"], claims["tier"]) == ("llama-7b", "evaluate", "low")
    assert claims["jti"] == body["grant_id"]
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]

    [grant] = _grants(broker)
    assert grant.id == body["grant_id"] and grant.status == "active"
    assert grant.rule == "dev-nightly-eval" and grant.policy_digest == broker.policy.digest
    assert grant.identity_claims["job_workflow_ref"].startswith("acme/workflows/")
    assert grant.reason == "nightly"
    [event] = _events(broker)
    assert event["type"] == "exchange.allowed" and event["grant_id"] == grant.id
    assert body["access_token"] not in json.dumps(event)


def test_requested_ttl_is_capped_by_the_action(client: TestClient, broker: Broker) -> None:
    short = client.post("/v1/token", data=exchange_form(eval_token(broker), requested_ttl="120"))
    assert short.json()["expires_in"] == 120
    long = client.post("/v1/token", data=exchange_form(eval_token(broker), requested_ttl="99999"))
    assert long.json()["expires_in"] == 3600


def test_denied_exchange_names_the_claim_and_is_recorded(
    client: TestClient, broker: Broker
) -> None:
    token = eval_token(
        broker, claims={"job_workflow_ref": "acme/evil/.github/workflows/x.yml@refs/heads/main"}
    )
    resp = client.post("/v1/token", data=exchange_form(token))
    assert resp.status_code == 403
    body = resp.json()
    assert body["error"] == "access_denied"
    assert "job_workflow_ref" in body["error_description"]
    assert "acme/evil/.github/workflows/x.yml@refs/heads/main" in body["error_description"]
    assert token not in resp.text
    assert _grants(broker) == []
    [event] = _events(broker)
    assert event["type"] == "exchange.denied" and event["error"] == "access_denied"
    assert token not in json.dumps(event)
    assert event["token_hmac"] == broker.audit.token_hmac(token)


def test_every_refusal_has_its_code_and_status(client: TestClient, broker: Broker) -> None:
    cases = [
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({"subject_token": ""}, 400, "invalid_request"),
        ({"subject_token_type": "urn:x"}, 400, "invalid_request"),
        ({"resource": "llama-7b"}, 400, "invalid_target"),
        ({"scope": "evaluate fine-tune"}, 400, "invalid_scope"),
        ({"resource": "model:nope"}, 400, "invalid_target"),
        ({"scope": "nope"}, 400, "invalid_scope"),
        ({"requested_token_type": "urn:broker:token-type:vault-token"}, 400, "invalid_request"),
        ({"requested_token_type": "urn:x"}, 400, "invalid_request"),
        ({"audience": "somewhere-else"}, 400, "invalid_target"),
        ({"lineage": "{not json"}, 400, "invalid_request"),
        (
            {"lineage": '{"datasets": [{"uri": "s3://d/x", "sha256": "zz"}]}'},
            400,
            "invalid_request",
        ),
        ({"requested_ttl": "-5"}, 400, "invalid_request"),
        ({"subject_token": "not-a-jwt"}, 400, "invalid_request"),
    ]
    for override, status, code in cases:
        token = eval_token(broker)  # single-use: every verified attempt spends its token
        resp = client.post("/v1/token", data={**exchange_form(token), **override})
        assert (resp.status_code, resp.json()["error"]) == (status, code), (override, resp.text)
        assert resp.json()["error_description"]
        assert token not in resp.text


def test_privileged_tier_answers_approval_required(client: TestClient, broker: Broker) -> None:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(
        sub="system:serviceaccount:training:trainer",
        claims={
            "kubernetes.io": {
                "namespace": "training",
                "serviceaccount": {"name": "trainer", "uid": "u-1"},
            }
        },
    )
    resp = client.post("/v1/token", data=exchange_form(token, action="fine-tune"))
    assert resp.status_code == 403
    assert resp.json()["error"] == "approval_required"
    assert _grants(broker) == []


def test_single_use_token_is_exchanged_once_even_concurrently(
    client: TestClient, broker: Broker
) -> None:
    token = eval_token(broker)
    results: list[int] = []

    def go() -> None:
        results.append(client.post("/v1/token", data=exchange_form(token)).status_code)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [400] * 7
    assert len(_grants(broker)) == 1
    again = client.post("/v1/token", data=exchange_form(token))
    assert "replayed" in again.json()["error_description"]


def test_a_refused_single_use_token_is_spent(client: TestClient, broker: Broker) -> None:
    token = eval_token(broker)
    assert (
        client.post("/v1/token", data=exchange_form(token, action="deploy-weights")).status_code
        == 403
    )
    resp = client.post("/v1/token", data=exchange_form(token))
    assert resp.status_code == 400 and "replayed" in resp.json()["error_description"]


def test_no_credential_when_the_event_cannot_be_recorded(
    client: TestClient, broker: Broker
) -> None:
    # A real database failure inside the exchange transaction, after the grant row was written.
    with broker.store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_events BEFORE INSERT ON events "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert resp.status_code == 503
    assert resp.json()["error"] == "temporarily_unavailable"
    assert "access_token" not in resp.json()
    assert _grants(broker) == []


def test_metrics_count_exchanges_by_outcome(client: TestClient, broker: Broker) -> None:
    client.post("/v1/token", data=exchange_form(eval_token(broker)))
    client.post("/v1/token", data=exchange_form(eval_token(broker), scope="nope"))
    text = client.get("/metrics").text
    assert 'broker_exchanges_total{outcome="issued"} 1.0' in text
    assert 'broker_exchanges_total{outcome="invalid_scope"} 1.0' in text
    assert "broker_exchange_seconds_bucket" in text


def test_event_indexes_are_dense_across_outcomes(client: TestClient, broker: Broker) -> None:
    for action in ("evaluate", "nope", "evaluate", "deploy-weights"):
        client.post("/v1/token", data=exchange_form(eval_token(broker), action=action))
    with broker.store.read() as s:
        idx = list(s.scalars(select(EventRow.idx).order_by(EventRow.idx)))
    assert idx == list(range(5))  # policy.loaded, then the four attempts
