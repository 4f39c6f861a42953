"""An approval covers exactly the credential that will be issued (issue 12 §2), end to end: the
audience and the TTL are bound, a mismatched approval_id names each difference and opens no
request, and a workload can open a request ahead of time for exactly what it will exchange."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.approvals.test_flow import K8S, LINEAGE, TRAINER, bearer, review, trainer
from tests.conftest import exchange_form, person_token
from tests.faults import grant_statuses


@pytest.fixture
def audiences(tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    """The example policy, where llama-7b's broker JWTs may also be for ``deploy-svc``."""
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/"
    )
    backends = "  llama-7b:\n    owners: [ml-platform]\n    backends:\n"
    assert backends in text
    text = text.replace(backends, f"{backends}      jwt: {{audiences: [deploy-svc]}}\n", 1)
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "data", policy=policy))
    try:
        with TestClient(create_app(broker=broker)) as client:
            yield client, broker
    finally:
        broker.close()


def fine_tune(client: TestClient, broker: Broker, **form: str) -> Any:
    """``fine-tune`` of llama-7b by the trainer, as broker JWTs (rule dev-trainer)."""
    form.setdefault("lineage", LINEAGE)
    return client.post("/v1/token", data=exchange_form(trainer(broker), action="fine-tune", **form))


def approved(client: TestClient, broker: Broker, **form: str) -> str:
    approval_id = str(fine_tune(client, broker, **form).json()["approval_id"])
    assert review(client, broker, approval_id, "approve", "bob@example.com").status_code == 200
    return approval_id


def request_ids(client: TestClient, broker: Broker) -> list[str]:
    admin = bearer(person_token(broker, "admin", sub="root@example.com"))
    return [a["id"] for a in client.get("/v1/approvals", headers=admin).json()["approvals"]]


def test_an_approval_without_audience_does_not_cover_another_audience(
    audiences: tuple[TestClient, Broker],
) -> None:
    """The issue's case: approved with none, exchanged with audience=deploy-svc: was 200."""
    client, broker = audiences
    approval_id = approved(client, broker)
    resp = fine_tune(client, broker, approval_id=approval_id, audience="deploy-svc")
    assert resp.status_code == 403 and resp.json()["error"] == "approval_required", resp.text
    assert "access_token" not in resp.text and grant_statuses(broker) == {}
    description = resp.json()["error_description"]
    assert (
        f"approval {approval_id} was given for a different request: "
        "audience: approved 'model:llama-7b', requested 'deploy-svc'; action fine-tune"
    ) in description
    assert "no request was opened" in description and "approval_id" not in resp.json()
    assert request_ids(client, broker) == [approval_id]
    # What was approved still works.
    assert fine_tune(client, broker, approval_id=approval_id).status_code == 200


def test_an_approval_covers_the_ttl_it_was_given_for(
    audiences: tuple[TestClient, Broker],
) -> None:
    client, broker = audiences
    approval_id = approved(client, broker)  # no requested_ttl: fine-tune's max, 4 h
    resp = fine_tune(client, broker, approval_id=approval_id, requested_ttl="600")
    assert resp.status_code == 403
    assert "ttl_seconds: approved 14400, requested 600" in resp.json()["error_description"]
    # A requested TTL above the cap gives the same credential: it is the same request.
    same = fine_tune(client, broker, approval_id=approval_id, requested_ttl="86400")
    assert same.status_code == 200 and same.json()["expires_in"] == 14400


def test_a_mismatch_names_each_difference_and_opens_nothing(
    audiences: tuple[TestClient, Broker],
) -> None:
    """A walk-through left stray pending requests: each mismatched exchange opened one."""
    client, broker = audiences
    approval_id = approved(client, broker, reason="November refresh")
    other = json.dumps({"datasets": [{"uri": "s3://datasets/approved/set-2"}]})
    for _ in range(3):
        resp = fine_tune(
            client,
            broker,
            approval_id=approval_id,
            audience="deploy-svc",
            requested_ttl="600",
            reason="December refresh",
            lineage=other,
        )
        assert resp.status_code == 403
    description = resp.json()["error_description"]
    for difference in (
        "audience: approved 'model:llama-7b', requested 'deploy-svc'",
        "ttl_seconds: approved 14400, requested 600",
        'lineage.datasets: approved [{"uri": "s3://datasets/approved/set-1"}], '
        'requested [{"uri": "s3://datasets/approved/set-2"}]',
        "reason: approved 'November refresh', requested 'December refresh'",
    ):
        assert difference in description
    assert request_ids(client, broker) == [approval_id]
    assert broker.approvals.get(approval_id)["status"] == "approved"  # not spent


def test_opened_ahead_for_an_audience_and_ttl_the_exchange_gets_exactly_that(
    audiences: tuple[TestClient, Broker],
) -> None:
    client, broker = audiences
    opened = client.post(
        "/v1/approvals",
        json={
            "model": "llama-7b",
            "action": "fine-tune",
            "audience": "deploy-svc",
            "requested_ttl": 600,
            "lineage": json.loads(LINEAGE),
        },
        headers=bearer(trainer(broker)),
    )
    assert opened.status_code == 201, opened.text
    view = opened.json()
    assert (view["audience"], view["ttl_seconds"]) == ("deploy-svc", 600)
    assert view["requested_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    # The exchange that would open a request for the same thing finds this one.
    same = fine_tune(client, broker, audience="deploy-svc", requested_ttl="600")
    assert same.json()["approval_id"] == view["id"]
    review(client, broker, view["id"], "approve", "bob@example.com")

    resp = fine_tune(
        client, broker, approval_id=view["id"], audience="deploy-svc", requested_ttl="600"
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] == 600
    claims = jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "deploy-svc"


def test_a_pending_approval_id_is_named_for_waiting_without_a_new_request(
    client: TestClient, broker: Broker
) -> None:
    first = fine_tune(client, broker)
    approval_id = first.json()["approval_id"]
    resp = fine_tune(client, broker, approval_id=approval_id)
    assert resp.status_code == 403 and resp.json()["approval_id"] == approval_id
    assert resp.json()["error_description"].startswith(
        f"approval {approval_id} is pending, not approved; "
    )
    assert f"request {approval_id} has 0 of 1" in resp.json()["error_description"]
    assert request_ids(client, broker) == [approval_id]


def test_another_workloads_approval_tells_nothing_of_it(client: TestClient, broker: Broker) -> None:
    secret = json.dumps({"datasets": [{"uri": "s3://datasets/approved/project-zeta"}]})
    theirs = approved(client, broker, lineage=secret, reason="zeta")
    assert broker.dev_issuer is not None
    other_sa = "system:serviceaccount:training:other"
    token = broker.dev_issuer.mint(sub=other_sa, claims=K8S)
    resp = client.post(
        "/v1/token",
        data=exchange_form(token, action="fine-tune", lineage=LINEAGE, approval_id=theirs),
    )
    assert resp.status_code == 403
    assert resp.json()["error_description"].startswith(
        f"approval '{theirs}' does not exist or was requested by another workload; "
    )
    assert "zeta" not in resp.text and "approval_id" not in resp.json()
    missing = fine_tune(client, broker, approval_id="a_" + "0" * 24)
    assert "does not exist or was requested by another workload" in missing.text
    assert grant_statuses(broker) == {} and len(request_ids(client, broker)) == 1


def test_a_long_approval_id_is_quoted_capped(client: TestClient, broker: Broker) -> None:
    resp = fine_tune(client, broker, approval_id="a_" + "x" * 5000)
    assert resp.status_code == 403 and resp.json()["audit_index"] is not None
    assert "[5002 characters, sha256:" in resp.json()["error_description"]
    assert len(resp.json()["error_description"]) < 1000


def test_a_refused_audience_opens_no_request(client: TestClient, broker: Broker) -> None:
    """The audience is checked before the approval: no stray request for a credential the
    broker would refuse anyway."""
    resp = fine_tune(client, broker, audience="somewhere-else")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_target", resp.text
    assert resp.json()["audit_index"] is not None
    assert request_ids(client, broker) == []


def test_the_view_shows_what_is_approved_and_what_changed_since_the_last_approval(
    audiences: tuple[TestClient, Broker],
) -> None:
    client, broker = audiences
    first = approved(client, broker, reason="November refresh")
    assert broker.approvals.get(first)["differs_from_last_approved"] is None
    fine_tune(client, broker, approval_id=first)  # used
    second = fine_tune(client, broker, reason="December refresh", audience="deploy-svc")
    view = client.get(
        f"/v1/approvals/{second.json()['approval_id']}", headers=bearer(trainer(broker))
    ).json()
    assert view["requester"] == {
        "issuer": "dev",
        "subject": TRAINER,
        "claims": {"sub": TRAINER, "kubernetes.io/namespace": "training"},
        "people": [],
    }
    assert (view["audience"], view["ttl_seconds"], view["reason"]) == (
        "deploy-svc",
        14400,
        "December refresh",
    )
    assert view["lineage"]["datasets"] == [{"uri": "s3://datasets/approved/set-1"}]
    last = view["differs_from_last_approved"]
    assert last["approval_id"] == first
    assert last["changes"] == [
        {"field": "audience", "last_approved": "model:llama-7b", "this": "deploy-svc"},
        {"field": "reason", "last_approved": "November refresh", "this": "December refresh"},
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requested_ttl", "600"),  # a JSON integer, as the exchange's form field is digits
        ("requested_ttl", True),
        ("requested_ttl", 0),
        ("requested_ttl", 10**9),
        ("audience", ""),
        ("audience", "x" * 5000),
    ],
)
def test_open_refuses_a_bad_audience_or_ttl(
    client: TestClient, broker: Broker, field: str, value: object
) -> None:
    resp = client.post(
        "/v1/approvals",
        json={"model": "llama-7b", "action": "fine-tune", field: value},
        headers=bearer(trainer(broker)),
    )
    assert resp.status_code == 400 and field in resp.json()["error_description"], resp.text
    assert request_ids(client, broker) == []
