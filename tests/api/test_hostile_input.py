"""POST /v1/token against hostile and careless input: never a 500, never a verified attempt
without its audit event and spent token, never an event too large to record."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from broker.backends.base import Credential
from broker.bounds import MAX_SHOWN_CHARS
from broker.grants.model import Grant
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import EventRow
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, eval_token, exchange_form, person_token


@pytest.fixture
def broker(data_dir: Path) -> Iterator[Broker]:
    """The dev broker, with a budget of unverifiable attempts no test here exhausts: these
    tests send far more malformed requests from one address than a client would."""
    settings = Settings(dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, refusal_burst=10**6)
    b = build_broker(settings)
    yield b
    b.close()


def event_at(broker: Broker, index: int) -> dict[str, Any]:
    with broker.store.read() as s:
        row = s.scalars(select(EventRow).where(EventRow.idx == index)).one()
        return dict(json.loads(row.body))


def log_size(broker: Broker) -> int:
    with broker.store.read() as s:
        return len(list(s.scalars(select(EventRow.idx))))


def spent(client: TestClient, token: str) -> bool:
    """Whether the single-use ``token`` was spent: a clean exchange of it is then refused."""
    resp = client.post("/v1/token", data=exchange_form(token))
    if resp.status_code == 200:
        return False
    assert "token replayed" in resp.json()["error_description"], resp.text
    return True


def assert_recorded_refusal(client: TestClient, broker: Broker, token: str, resp: Any) -> None:
    """A verified token's refusal: a 4xx/503 with its audit index, its event, a spent token."""
    assert resp.status_code in (400, 403, 503), resp.text
    body = resp.json()
    event = event_at(broker, body["audit_index"])
    assert event["type"] == "exchange.denied" and event["error"] == body["error"]
    assert event["identity"]["subject"] == EVAL_SUB
    assert spent(client, token)


@pytest.mark.parametrize(
    "lineage",
    [
        "[" * 1000 + "]" * 1000,
        json.dumps({"datasets": [{"uri": "s3://d/x", "sha256": "0" * 64}]})[:-1]
        + ', "n": '
        + "9" * 5000
        + "}",
        '{"datasets": [{"uri": "s3://d/\\ud800"}]}',
        '{"weights": [{"uri": "s3://w/x", "n": 1e999}]}',
    ],
    ids=["deep", "huge-number", "lone-surrogate", "infinite"],
)
def test_hostile_lineage_is_a_recorded_400(
    client: TestClient, broker: Broker, lineage: str
) -> None:
    token = eval_token(broker)
    resp = client.post("/v1/token", data=exchange_form(token, lineage=lineage))
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", resp.text
    assert "lineage" in resp.json()["error_description"]
    assert_recorded_refusal(client, broker, token, resp)


@pytest.mark.parametrize("field", ["requested_token_type", "model", "scope", "audience"])
def test_a_huge_field_is_recorded_capped(client: TestClient, broker: Broker, field: str) -> None:
    """33 KB in a field once made the denial event pass the 64 KiB cap: a 500, nothing written."""
    token = eval_token(broker)
    huge = "x" * 33_000
    form = exchange_form(token, **({"resource": f"model:{huge}"} if field == "model" else {}))
    if field != "model":
        form[field] = huge
    resp = client.post("/v1/token", data=form)
    assert_recorded_refusal(client, broker, token, resp)
    body = resp.json()
    assert huge not in body["error_description"]
    event = event_at(broker, body["audit_index"])
    recorded = json.dumps(event)
    assert huge not in recorded and len(recorded) < 8_000
    assert "33000 characters, sha256:" in recorded


@pytest.mark.parametrize("ttl", ["²", "٣", "9" * 4301, "1" * 10, "-5", "0", " 60"])
def test_requested_ttl_is_ascii_digits_of_bounded_length(
    client: TestClient, broker: Broker, ttl: str
) -> None:
    """Refused before the token is looked at: the same answer for any token, nothing spent."""
    token = eval_token(broker)
    resp = client.post("/v1/token", data=exchange_form(token, requested_ttl=ttl))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error_description"].startswith("requested_ttl: expected a positive")
    garbage = client.post("/v1/token", data=exchange_form("x.y.z", requested_ttl=ttl))
    assert garbage.json() == resp.json()
    assert not spent(client, token)


@pytest.mark.parametrize("field", ["reason", "approval_id", "scope"])
def test_a_nul_in_any_field_is_refused_before_the_token_is_read(
    client: TestClient, broker: Broker, field: str
) -> None:
    token = eval_token(broker)
    resp = client.post("/v1/token", data={**exchange_form(token), field: "a\x00b"})
    assert resp.status_code == 400
    assert resp.json()["error_description"] == f"{field}: contains a NUL character"
    assert not spent(client, token)


def test_a_token_expiring_in_the_year_10000_is_refused_before_any_credential(
    client: TestClient, broker: Broker, data_dir: Path
) -> None:
    assert broker.dev_issuer is not None
    key = broker.dev_issuer._key  # the dev issuer's own key, as the store holds it
    kid = jwt.get_unverified_header(eval_token(broker))["kid"]
    now = int(time.time())
    claims = {
        "iss": "https://dev.broker.invalid/workload",
        "sub": EVAL_SUB,
        "aud": "model-broker",
        "iat": now,
        "exp": 253402300800,
        "jti": "far-future",
        "job_workflow_ref": EVAL_WORKFLOW,
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    before = log_size(broker)
    resp = client.post("/v1/token", data=exchange_form(token))
    assert resp.status_code == 400, resp.text
    assert "claim exp" in resp.json()["error_description"]
    assert "outside the accepted range" in resp.json()["error_description"]
    assert log_size(broker) == before + 1  # its denial event


class _BrokenBackend:
    """A jwt backend of our own Backend protocol that fails as a bug would."""

    name = "jwt"
    external = False
    token_types = ("urn:ietf:params:oauth:token-type:jwt",)

    def issue(self, grant: Grant) -> Credential:
        raise RuntimeError("a bug nobody foresaw")

    def revoke(self, grant: Grant) -> bool:
        return True


def test_an_unexpected_error_after_verification_is_a_recorded_refusal(
    client: TestClient, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    broker.grants.backends._backends["jwt"] = _BrokenBackend()  # type: ignore[assignment]
    token = eval_token(broker)
    resp = client.post("/v1/token", data=exchange_form(token))
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["error"] == "temporarily_unavailable" and "access_token" not in body
    assert "nothing was issued" in body["error_description"]
    assert "a bug nobody foresaw" not in resp.text
    assert "a bug nobody foresaw" in caplog.text  # the operator sees it
    assert_recorded_refusal(client, broker, token, resp)


# --- a property: whatever one field holds --------------------------------------------------------

FIELDS = [
    "grant_type",
    "subject_token_type",
    "resource",
    "scope",
    "requested_token_type",
    "audience",
    "requested_ttl",
    "reason",
    "lineage",
    "approval_id",
    "actor_token",
]
anything = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=3000),
    st.sampled_from(["²", "9" * 5000, "[" * 2000, '{"datasets": [', "model:", "model:llama-7b"]),
    st.integers().map(str),
    st.recursive(st.integers() | st.text(max_size=5), st.lists, max_leaves=30).map(json.dumps),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=st.sampled_from(FIELDS), value=anything)
def test_any_field_with_a_valid_token_is_answered_and_accounted_for(
    client: TestClient, broker: Broker, field: str, value: str
) -> None:
    """With a valid single-use token and one field set to anything: never a 5xx other than a
    recorded 503; a refusal after verification carries its audit index, its event exists and
    the token is spent; a refusal before verification is the same for any token and spends
    nothing."""
    token = eval_token(broker)
    form = {**exchange_form(token), field: value}
    resp = client.post("/v1/token", data=form)
    assert resp.status_code in (200, 400, 403, 503), resp.text
    body = resp.json()
    if resp.status_code == 200:
        assert spent(client, token)
        return
    assert body["error"] and len(body["error_description"]) < 4_000
    if "audit_index" in body:
        assert_recorded_refusal(client, broker, token, resp)
    else:
        assert resp.status_code == 400
        same = client.post("/v1/token", data={**form, "subject_token": "x.y.z"}).json()
        assert same == body
        assert not spent(client, token)


def test_shown_values_are_capped_at_the_documented_length() -> None:
    from broker.bounds import capped

    assert capped("a" * MAX_SHOWN_CHARS) == "a" * MAX_SHOWN_CHARS
    long = capped("a" * (MAX_SHOWN_CHARS + 1))
    assert long.startswith("a" * MAX_SHOWN_CHARS + "…[257 characters, sha256:")
    assert capped("a" * 300) != capped("a" * 299 + "b")


# --- the rest of the API -------------------------------------------------------------------------


def test_admin_bodies_are_bounded_and_must_declare_their_length(
    client: TestClient, broker: Broker
) -> None:
    auth = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
    big = client.post("/v1/revocations", content=b"x" * 300_000, headers=auth)
    assert big.status_code == 413 and big.json()["error"] == "invalid_request"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "llama-7b", '
        yield b'"reason": "r"}'

    chunked = client.post("/v1/revocations", content=chunks(), headers=auth)
    assert chunked.status_code == 411, chunked.text


def test_a_body_that_does_not_parse_is_a_400_in_the_broker_s_shape(
    client: TestClient, broker: Broker
) -> None:
    deep = '{"model": "llama-7b", "action": "fine-tune", "lineage": ' + "[" * 5000 + "]" * 5000
    auth = {"Authorization": f"Bearer {eval_token(broker)}", "Content-Type": "application/json"}
    resp = client.post("/v1/approvals", content=deep + "}", headers=auth)
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_request"
    assert client.get("/v1/no-such-route").json()["error"] == "not_found"
