"""POST /v1/token: the contract's fields, errors and the grant + event it records."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.requests import ClientDisconnect

from broker.api.token import exchange, exchange_fields, read_form
from broker.audit.checkpoint import NoteVerifier
from broker.audit.export import verify_store
from broker.audit.merkle import root_from_leaves
from broker.errors import InvalidRequest
from broker.runtime import Broker
from broker.store.tables import EventRow, GrantRow
from tests.conftest import EVAL_SUB, eval_token, exchange_form, post_concurrently

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


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
    results = [status for status, _ in post_concurrently(client, [exchange_form(token)] * 8)]
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


def test_event_indexes_are_dense_across_outcomes(client: TestClient, broker: Broker) -> None:
    for action in ("evaluate", "nope", "evaluate", "deploy-weights"):
        client.post("/v1/token", data=exchange_form(eval_token(broker), action=action))
    with broker.store.read() as s:
        idx = list(s.scalars(select(EventRow.idx).order_by(EventRow.idx)))
    assert idx == list(range(5))  # policy.loaded, then the four attempts


def _assert_log_exact(broker: Broker) -> int:
    """Dense indexes, the stored tree equals the tree of the event bodies, and a checkpoint
    signed over it verifies. Returns the log's size."""
    with broker.store.write() as s:
        broker.audit.sign_checkpoint(s, dt.datetime.now(dt.UTC))
    with broker.store.read() as s:
        rows = list(s.execute(select(EventRow.idx, EventRow.body).order_by(EventRow.idx)))
        assert [r.idx for r in rows] == list(range(len(rows)))
        assert broker.audit.root(s, len(rows)) == root_from_leaves([r.body for r in rows])
        report = verify_store(s, NoteVerifier.from_vkey(broker.audit.verifier_key()))
    assert report.ok, report.problems
    return len(rows)


def test_the_body_must_be_a_small_urlencoded_form(client: TestClient, broker: Broker) -> None:
    token = eval_token(broker)
    form = exchange_form(token)
    cases = [
        ({"json": form}, "Content-Type: expected application/x-www-form-urlencoded"),
        ({"content": urlencode(form), "headers": {"Content-Type": "text/plain"}}, "Content-Type"),
        ({"data": {**form, "reason": "x" * 70_000}}, "body: larger than 65536 bytes"),
        (
            {"content": urlencode(form) + "&x=1" * 100, "headers": FORM},
            "body: expected at most 64 form fields",
        ),
        ({"content": urlencode(form) + "&reason=%ff", "headers": FORM}, "UTF-8"),
    ]
    for kwargs, expected in cases:
        resp = client.post("/v1/token", **kwargs)  # type: ignore[arg-type]
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == "invalid_request"
        assert expected in resp.json()["error_description"]
        assert token not in resp.text
    # Refused before verification: the token was not spent.
    assert client.post("/v1/token", data=form).status_code == 200


def test_the_endpoint_takes_only_post(client: TestClient) -> None:
    for method in ("GET", "PUT", "DELETE"):
        resp = client.request(method, "/v1/token")
        assert resp.status_code == 405, method
        assert resp.headers["allow"] == "POST"
        assert resp.headers["cache-control"] == "no-store"
        assert resp.json() == {
            "error": "invalid_request",
            "error_description": f"method {method}: expected POST",
        }
    # Only the exact path is the token endpoint; its neighbours are the router's.
    assert client.post("/v1/token/x", data={}).status_code == 404


def test_answers_are_never_cached(client: TestClient, broker: Broker) -> None:
    ok = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    refused = client.post("/v1/token", data={"grant_type": "password"})
    for resp in (ok, refused):
        assert resp.headers["cache-control"] == "no-store"
        assert resp.headers["pragma"] == "no-cache"
        assert resp.headers["content-type"] == "application/json"
    assert (ok.status_code, refused.status_code) == (200, 400)


def test_repeated_fields_are_refused(client: TestClient, broker: Broker) -> None:
    cases = [
        ("resource", "model:llama-7b", "invalid_target", "resource: expected exactly one"),
        ("audience", "model:llama-7b", "invalid_target", "audience: expected exactly one"),
        ("scope", "evaluate", "invalid_request", "scope: expected at most one, got 2"),
        ("subject_token", "x", "invalid_request", "subject_token: expected at most one"),
    ]
    for name, value, code, text in cases:
        token = eval_token(broker)
        pairs = [*exchange_form(token).items(), (name, value)]
        if name == "audience":
            pairs.append((name, value))
        resp = client.post("/v1/token", content=urlencode(pairs), headers=FORM)
        assert (resp.status_code, resp.json()["error"]) == (400, code), resp.text
        assert text in resp.json()["error_description"]
        assert token not in resp.text


def test_blank_optional_fields_count_as_absent(client: TestClient, broker: Broker) -> None:
    form = exchange_form(eval_token(broker), reason="", requested_ttl="", approval_id="")
    resp = client.post("/v1/token", data=form)
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] == 3600


def test_openapi_describes_the_token_form(client: TestClient) -> None:
    post = client.get("/openapi.json").json()["paths"]["/v1/token"]["post"]
    schema = post["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    assert set(schema["required"]) == {
        "grant_type",
        "subject_token",
        "subject_token_type",
        "resource",
        "scope",
    }
    assert {"requested_token_type", "audience", "reason", "lineage", "approval_id"} <= set(
        schema["properties"]
    )
    assert schema["properties"]["resource"]["type"] == "array"


def test_concurrent_exchanges_keep_the_log_exact(client: TestClient, broker: Broker) -> None:
    replayed = eval_token(broker)
    forms = [exchange_form(eval_token(broker)) for _ in range(24)]
    forms += [exchange_form(eval_token(broker), action="deploy-weights") for _ in range(4)]
    forms += [exchange_form(replayed) for _ in range(4)]
    results = post_concurrently(client, forms)
    assert [status for status, _ in results[:24]] == [200] * 24
    assert [status for status, _ in results[24:28]] == [403] * 4
    assert sorted(status for status, _ in results[28:]) == [200, 400, 400, 400]
    assert len(_grants(broker)) == 25
    assert _assert_log_exact(broker) == 1 + 32  # policy.loaded and every attempt


def test_replays_in_one_group_commit_fail_only_themselves(
    client: TestClient, broker: Broker
) -> None:
    token, other = eval_token(broker), eval_token(broker)
    first: list[tuple[int, str]] = []
    results: list[tuple[int, str]] = []
    threads = [
        threading.Thread(
            target=lambda: first.extend(post_concurrently(client, [exchange_form(other)]))
        ),
        threading.Thread(
            target=lambda: results.extend(post_concurrently(client, [exchange_form(token)] * 6))
        ),
    ]
    # While this holds the store's writer lock, the writer waits with a batch of the first
    # exchange, and the six exchanges of one token queue up for the batch after it.
    with broker.store.write():
        threads[0].start()
        time.sleep(0.3)
        threads[1].start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert first[0][0] == 200
    assert sorted(status for status, _ in results) == [200] + [400] * 5
    assert all("replayed" in body for status, body in results if status == 400)
    assert token not in "".join(body for _, body in results)
    assert len(_grants(broker)) == 2
    events = _events(broker)
    assert sorted(e["type"] for e in events) == ["exchange.allowed"] * 2 + ["exchange.denied"] * 5
    assert _assert_log_exact(broker) == 1 + 7


def test_no_credential_when_a_group_commit_fails(client: TestClient, broker: Broker) -> None:
    with broker.store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_grants BEFORE INSERT ON grants "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    results = post_concurrently(client, [exchange_form(eval_token(broker)) for _ in range(8)])
    assert [status for status, _ in results] == [503] * 8
    assert all("access_token" not in body for _, body in results)
    assert _grants(broker) == []
    with broker.store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_grants")
    assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200
    assert len(_grants(broker)) == 1
    _assert_log_exact(broker)


def test_spent_jtis_are_forgotten_only_after_their_tokens_expire(
    client: TestClient, broker: Broker
) -> None:
    token = eval_token(broker, ttl=60)
    assert client.post("/v1/token", data=exchange_form(token)).status_code == 200
    assert broker.grants.purge_spent_tokens() == 0  # still valid: the jti must stay spent
    assert client.post("/v1/token", data=exchange_form(token)).status_code == 400
    real = broker.grants.clock
    broker.grants.clock = lambda: real() + dt.timedelta(minutes=10)
    assert broker.grants.purge_spent_tokens() == 1


def test_the_event_loop_not_a_thread_awaits_the_commit(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a single exchange thread, two exchanges still reach the group commit together:
    the thread is free again once an exchange's write is queued."""
    submitted: list[object] = []
    submit = broker.grants._writes.submit

    def spy(item: Any, done: Any) -> None:
        submitted.append(item)
        submit(item, done)

    monkeypatch.setattr(broker.grants._writes, "submit", spy)
    reqs = [exchange_fields(parse_qs(urlencode(exchange_form(eval_token(broker))))) for _ in "ab"]
    results: list[Any] = []

    async def both() -> list[Any]:
        return await asyncio.gather(*(exchange(broker.grants, r, pool) for r in reqs))

    with ThreadPoolExecutor(1) as pool:
        runner = threading.Thread(target=lambda: results.extend(asyncio.run(both())))
        with broker.store.write():  # nothing can commit meanwhile
            runner.start()
            deadline = time.monotonic() + 5  # below the writer's 10 s lock timeout
            while len(submitted) < 2:
                assert time.monotonic() < deadline, f"{len(submitted)} of 2 writes queued"
                time.sleep(0.01)
            assert results == []
        runner.join(10)
    assert len(results) == 2
    assert {r.grant.id for r in results} == {g.id for g in _grants(broker)}


def _receiver(messages: list[dict[str, object]]) -> Any:
    pending = list(messages)

    async def receive() -> dict[str, object]:
        return pending.pop(0)

    return receive


def _form_scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "headers": [(b"host", b"x"), *headers]}


def test_read_form_reads_chunks_against_the_cap_without_a_length() -> None:
    form_type = (b"content-type", b"application/x-www-form-urlencoded; charset=utf-8")
    chunks = [b"scope=eva", b"luate&resource=model%3A", b"llama-7b"]
    messages: list[dict[str, object]] = [
        {"type": "http.request", "body": c, "more_body": True} for c in chunks
    ]
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    got = asyncio.run(read_form(_form_scope(form_type), _receiver(messages)))
    assert got == {"scope": ["evaluate"], "resource": ["model:llama-7b"]}
    # A chunked body (no Content-Length) over the cap stops being read at the cap.
    big = {"type": "http.request", "body": b"a=" + b"x" * 40_000, "more_body": True}
    with pytest.raises(InvalidRequest, match="larger than 65536 bytes"):
        asyncio.run(read_form(_form_scope(form_type), _receiver([big, big, big])))
    with pytest.raises(ClientDisconnect):
        gone = [{"type": "http.request", "body": b"a=1", "more_body": True}]
        asyncio.run(
            read_form(_form_scope(form_type), _receiver([*gone, {"type": "http.disconnect"}]))
        )
    # The first Content-Type is the one that counts (as Starlette's Headers.get answers).
    second = (b"content-type", b"application/x-www-form-urlencoded")
    with pytest.raises(InvalidRequest, match="Content-Type: expected"):
        asyncio.run(read_form(_form_scope((b"content-type", b"text/plain"), second), _receiver([])))
    for declared in (b"70000", b"", b"\xb2", b"-1", b" 5"):  # too large, or not ASCII digits
        with pytest.raises(InvalidRequest, match="larger than"):
            length = (b"content-length", declared)
            asyncio.run(read_form(_form_scope(form_type, length), _receiver([])))
