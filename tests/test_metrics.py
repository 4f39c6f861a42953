"""The metrics after real traffic: counts per label set, labels that callers cannot grow, the
store's queues (and a scrape that survives the store failing), key ages per issuer."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from broker.api.app import create_app
from broker.audit.log import AuditLog
from broker.metrics import _StoreMetrics
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.conftest import eval_token, exchange_form, person_token
from tests.scrape import Scrape, parse, scrape_everything

TRAINER = "system:serviceaccount:training:trainer"
K8S = {"kubernetes.io": {"namespace": "training"}}
LINEAGE = json.dumps({"datasets": ["s3://datasets/approved/set-1"]})
CLUSTER_KID = json.loads((EXAMPLE_POLICY.parent / "keys" / "cluster-jwks.json").read_text())[
    "keys"
][0]["kid"]
EXCHANGES = "broker_exchanges_total"


def scrape(client: TestClient) -> Scrape:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return parse(resp.text)


def admin(broker: Broker) -> dict[str, str]:
    return {"Authorization": f"Bearer {person_token(broker, 'admin', sub='root@example.com')}"}


def post(client: TestClient, form: dict[str, str]) -> str:
    """POST the exchange; its outcome as the metrics should count it."""
    resp = client.post("/v1/token", data=form)
    return "issued" if resp.status_code == 200 else str(resp.json()["error"])


def test_traffic_is_counted_per_model_action_backend_and_outcome(
    client: TestClient, broker: Broker
) -> None:
    issued = [client.post("/v1/token", data=exchange_form(eval_token(broker))) for _ in range(3)]
    assert [r.status_code for r in issued] == [200, 200, 200]
    outcomes = {
        "bad_scope": post(client, exchange_form(eval_token(broker), action="nope")),
        "unknown_model": post(client, exchange_form(eval_token(broker), model="gpt-x")),
        "garbage": post(client, exchange_form("not-a-jwt")),
        "denied": post(client, exchange_form(eval_token(broker), action="deploy-weights")),
    }
    assert broker.dev_issuer is not None
    trainer = broker.dev_issuer.mint(sub=TRAINER, claims=K8S)
    approval = client.post(
        "/v1/token", data=exchange_form(trainer, action="fine-tune", lineage=LINEAGE)
    )
    assert approval.json()["error"] == "approval_required" and approval.json()["approval_id"]
    revoked = client.post(
        f"/v1/grants/{issued[0].json()['grant_id']}/revoke",
        json={"reason": "done"},
        headers=admin(broker),
    )
    assert revoked.status_code == 200

    m = scrape(client)
    count = lambda model, action, outcome: m.value(  # noqa: E731
        EXCHANGES, model=model, action=action, backend="jwt", outcome=outcome
    )
    assert count("llama-7b", "evaluate", "issued") == 3
    assert count("llama-7b", "other", outcomes["bad_scope"]) == 1
    assert count("other", "evaluate", outcomes["unknown_model"]) == 1
    assert count("llama-7b", "evaluate", outcomes["garbage"]) == 1
    assert count("llama-7b", "deploy-weights", outcomes["denied"]) == 1
    assert count("llama-7b", "fine-tune", "approval_required") == 1
    assert sum(m.samples[k] for k in m.samples if k[0] == EXCHANGES) == 8
    assert m.value("broker_exchange_seconds_count", backend="jwt") == 8
    assert m.value("broker_refusals_total", endpoint="/v1/token", reason="malformed") == 1
    assert m.value("broker_refusals_total", endpoint="/v1/token", reason="approval_required") == 1
    assert m.value("broker_backend_call_seconds_count", backend="jwt", operation="issue") == 3
    assert m.value("broker_backend_call_seconds_count", backend="jwt", operation="revoke") == 1
    assert m.value("broker_backend_call_errors_total", backend="jwt", operation="revoke") is None
    assert m.value("broker_approvals_pending") == 1
    assert m.value("broker_revocations_pending") == 0
    assert m.value("broker_revocation_oldest_pending_seconds") == 0
    assert m.value("broker_store_scrape_error") == 0
    assert m.value("broker_policy_info", digest=broker.policy.digest) == 1
    assert len(m.series("broker_policy_info")) == 1
    with broker.store.read() as session:
        assert m.value("broker_audit_log_size") == AuditLog.size(session)


def test_caller_strings_never_become_label_values(client: TestClient, broker: Broker) -> None:
    post(client, exchange_form(eval_token(broker), model="bogus-first"))
    before = scrape(client).series(EXCHANGES)
    for i in range(50):
        post(client, exchange_form(eval_token(broker), model=f"bogus-model-{i}"))
        post(client, exchange_form(eval_token(broker), action=f"bogus-action-{i}"))
        post(
            client,
            exchange_form(eval_token(broker), requested_token_type=f"urn:bogus:{i}"),
        )
    m = scrape(client)
    after = m.series(EXCHANGES)
    assert len(after) == len(before) + 2  # other action, other backend: once each
    shown = {value for labels in after for value in labels.values()}
    assert not any("bogus" in value for value in shown)
    assert {labels["model"] for labels in after} <= {"llama-7b", "other"}
    assert sum(m.samples[k] for k in m.samples if k[0] == EXCHANGES) == 151


@pytest.fixture
def tight(data_dir: Path) -> Iterator[tuple[TestClient, Broker]]:
    """A broker whose budget of unverifiable attempts is two per address."""
    settings = Settings(
        dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, refusal_burst=2, refusal_rate=0.001
    )
    broker = build_broker(settings)
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def test_429s_are_counted_per_endpoint(tight: tuple[TestClient, Broker]) -> None:
    client, _ = tight
    statuses = [client.post("/v1/token", data=exchange_form("garbage")).status_code]
    statuses += [client.post("/v1/token", data=exchange_form("garbage")).status_code]
    statuses += [client.post("/v1/token", data=exchange_form("garbage")).status_code]
    garbage = {"Authorization": "Bearer garbage"}
    statuses += [client.post("/v1/introspect", data={"token": "x"}, headers=garbage).status_code]
    assert statuses == [400, 400, 429, 429]
    m = scrape(client)
    assert m.value("broker_refusals_total", endpoint="/v1/token", reason="rate_limited") == 1
    assert m.value("broker_refusals_total", endpoint="/v1/introspect", reason="rate_limited") == 1
    assert m.value("broker_refusals_total", endpoint="/v1/token", reason="malformed") == 2
    # Refused before its form is read: nothing of the request is known.
    rate_limited = m.value(
        EXCHANGES, model="other", action="other", backend="other", outcome="rate_limited"
    )
    assert rate_limited == 1


def test_introspection_refusals_are_counted(client: TestClient, broker: Broker) -> None:
    garbage = {"Authorization": "Bearer garbage"}
    assert client.post("/v1/introspect", data={"token": "x"}, headers=garbage).status_code == 401
    m = scrape(client)
    assert m.value("broker_refusals_total", endpoint="/v1/introspect", reason="malformed") == 1


def test_key_age_is_exported_per_issuer_once_its_keys_were_needed(
    client: TestClient, broker: Broker
) -> None:
    before = scrape(client)
    assert before.series("broker_jwks_age_seconds") == []
    assert before.value("broker_jwks_max_age_seconds", issuer="cluster") == 86400
    # A token naming the cluster issuer and its key: the key set is read (from the policy's
    # jwks_file), then the signature fails, since the key that signed it is not the cluster's.
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = {"iss": "https://kubernetes.default.svc", "sub": TRAINER, "aud": "model-broker"}
    forged = jwt.encode(
        {**claims, "iat": now, "exp": now + 300},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": CLUSTER_KID},
    )
    assert post(client, exchange_form(forged)) == "invalid_request"
    m = scrape(client)
    assert m.value("broker_refusals_total", endpoint="/v1/token", reason="bad_signature") == 1
    ages = m.series("broker_jwks_age_seconds")
    assert ages == [{"issuer": "cluster"}]  # not github (never needed), not the dev issuers
    age = m.value("broker_jwks_age_seconds", issuer="cluster")
    assert age is not None and 0 <= age < 86400
    issuers = {labels["issuer"] for labels in m.series("broker_jwks_max_age_seconds")}
    assert issuers == {"github", "cluster", "sso"}


def test_a_store_that_fails_does_not_fail_the_scrape(client: TestClient, broker: Broker) -> None:
    client.post("/v1/token", data=exchange_form(eval_token(broker)))
    with broker.store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE approval_requests RENAME TO approvals_away")
    try:
        m = scrape(client)
    finally:
        with broker.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE approvals_away RENAME TO approval_requests")
    assert m.value("broker_store_scrape_error") == 1
    assert m.value("broker_approvals_pending") is None
    assert m.value("broker_revocations_pending") is None
    issued = m.value(
        EXCHANGES, model="llama-7b", action="evaluate", backend="jwt", outcome="issued"
    )
    assert issued == 1  # the rest of the scrape is there


def test_the_store_is_read_at_most_once_per_cache_period(broker: Broker) -> None:
    now = [0.0]
    collector = _StoreMetrics(broker.store, [], ttl=5.0, clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(collector)
    first = parse(generate_latest(registry).decode())
    assert first.value("broker_store_scrape_error") == 0
    with broker.store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE approval_requests RENAME TO approvals_away")
    try:
        now[0] = 4.9
        cached = parse(generate_latest(registry).decode())
        now[0] = 5.0
        failed = parse(generate_latest(registry).decode())
    finally:
        with broker.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE approvals_away RENAME TO approval_requests")
    assert cached.value("broker_store_scrape_error") == 0
    assert cached.value("broker_approvals_pending") == first.value("broker_approvals_pending")
    assert failed.value("broker_store_scrape_error") == 1
    now[0] = 10.0
    recovered = parse(generate_latest(registry).decode())
    assert recovered.value("broker_store_scrape_error") == 0
    assert recovered.value("broker_approvals_pending") == 0


def test_publication_lag_is_exported_per_target(data_dir: Path) -> None:
    m = scrape_everything(data_dir)
    lag = m.value("broker_audit_publish_lag_seconds", target="webhook")
    assert lag is not None and lag >= 0
    assert m.value("broker_audit_publish_pending", target="webhook") is not None
    assert m.value("broker_audit_checkpoint_age_seconds") is not None


def test_the_doc_lists_every_metric_with_its_type(data_dir: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    rows = re.findall(r"^\| `(broker_[a-z_]+)` \| (counter|gauge|histogram)", doc, re.MULTILINE)
    documented = {name.removesuffix("_total"): kind for name, kind in rows}
    # prometheus_client writes each counter's and histogram's `_created` as a gauge of its own
    scraped = scrape_everything(data_dir)
    types = scraped.types
    assert documented == {name: t for name, t in types.items() if not name.endswith("_created")}
    # and every name the doc's alert suggestions use is one the broker exports
    assert set(re.findall(r"broker_[a-z_]+", doc)) - scraped.names() - set(types) == set()
