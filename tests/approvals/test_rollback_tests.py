"""Rollback tests the broker witnessed: reported by a workload the policy allows
``rollback-test`` (POST /v1/rollback-tests), recorded with an event, read by people, and the
only evidence the rollback gate counts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.approvals.support import (
    DRILL,
    DRILL_WORKFLOW,
    POINT,
    drill_token,
    point_lineage,
    report_test,
)
from tests.approvals.test_flow import RELEASE, bearer, releaser, review, reviewer
from tests.conftest import eval_token, exchange_form
from tests.grants.support import events


def deploy(client: TestClient, broker: Broker, token: str | None = None, **form: str) -> Any:
    form.setdefault("lineage", point_lineage())
    data = exchange_form(token or releaser(broker), action="deploy-weights", **form)
    return client.post("/v1/token", data=data)


def approve_twice(client: TestClient, broker: Broker, approval_id: str) -> Any:
    first = review(client, broker, approval_id, "approve", "bob@example.com")
    if first.status_code != 200:
        return first
    return review(client, broker, approval_id, "approve", "carol@example.com")


# --- reporting -----------------------------------------------------------------------------------


def test_a_permitted_workload_records_a_test_with_an_event(
    client: TestClient, broker: Broker
) -> None:
    resp = report_test(
        client,
        drill_token(broker),
        evidence_uri="https://ci.example.com/runs/8812",
        started_at="2026-11-25T09:00:00Z",
        finished_at="2026-11-25T10:12:00+01:00",
    )
    assert resp.status_code == 201, resp.text
    test = resp.json()
    assert test["id"].startswith("rt_")
    assert test["rollback_point"] == POINT and test["result"] == "passed"
    assert test["evidence_uri"] == "https://ci.example.com/runs/8812"
    assert (test["started_at"], test["finished_at"]) == (
        "2026-11-25T09:00:00.000Z",
        "2026-11-25T09:12:00.000Z",
    )
    assert test["reporter"]["issuer"] == "dev" and test["reporter"]["subject"] == DRILL
    assert test["reporter"]["claims"] == {"sub": DRILL, "job_workflow_ref": DRILL_WORKFLOW}
    assert test["rule"] == "dev-rollback-tester"

    [event] = events(broker, "rollback_test.recorded")
    assert event["rollback_test_id"] == test["id"]
    assert event["rollback_point"] == POINT and event["result"] == "passed"
    assert event["reporter"]["subject"] == DRILL and event["policy_digest"] == broker.policy.digest
    auditor = reviewer(broker, "audra@example.com", "auditor")
    entry = client.get(
        "/v1/audit/entries",
        params={"start": test["audit_index"], "end": test["audit_index"] + 1},
        headers=auditor,
    ).json()["entries"][0]
    assert entry["event"]["type"] == "rollback_test.recorded"


def test_a_bad_bearer_is_401(client: TestClient, broker: Broker) -> None:
    body = {"model": "llama-7b", "rollback_point": POINT, "result": "passed"}
    assert client.post("/v1/rollback-tests", json=body).status_code == 401
    for token in ("garbage", drill_token(broker)[:-4] + "AAAA"):
        resp = client.post("/v1/rollback-tests", json=body, headers=bearer(token))
        assert resp.status_code == 401 and resp.json()["error"] == "invalid_token"
    assert broker.rollback_tests.find() == []


@pytest.mark.parametrize(
    ("who", "model"),
    [("releaser", "llama-7b"), ("evaluator", "llama-7b"), ("drill", "mistral-7b")],
)
def test_without_a_rule_for_rollback_test_on_the_model_it_is_403_and_recorded(
    client: TestClient, broker: Broker, who: str, model: str
) -> None:
    token = {"releaser": releaser, "evaluator": eval_token, "drill": drill_token}[who](broker)
    resp = report_test(client, token, model=model)
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"] == "access_denied"
    assert "no rule allows" in resp.json()["error_description"]
    assert broker.rollback_tests.find() == []
    [event] = events(broker, "rollback_test.refused")
    assert event["error"] == "access_denied" and event["model"] == model
    assert resp.json()["audit_index"] is not None
    # The refusal spent the single-use token, as an exchange's does.
    again = report_test(client, token, model=model)
    assert again.status_code == 401 and "replayed" in again.json()["error_description"]


def test_a_single_use_token_reports_once(client: TestClient, broker: Broker) -> None:
    token = drill_token(broker)
    assert report_test(client, token).status_code == 201
    replayed = report_test(client, token)
    assert replayed.status_code == 401, replayed.text
    assert "token replayed" in replayed.json()["error_description"]
    assert len(broker.rollback_tests.find()) == 1
    # Spent for exchanges too: one used_tokens row per jti, whatever used it.
    exchanged = client.post("/v1/token", data=exchange_form(token, action="rollback-test"))
    assert exchanged.status_code == 400 and "replayed" in exchanged.json()["error_description"]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"result": "maybe"}, "result"),
        ({"rollback_point": {"uri": POINT["uri"]}}, "rollback_point.sha256"),
        ({"rollback_point": {**POINT, "sha256": "AB" * 32}}, "rollback_point.sha256"),
        (
            {"rollback_point": {**POINT, "uri": "s3://models/llama-7b/weights/../v40"}},
            "rollback_point.uri: a '..' segment",
        ),
        ({"evidence_uri": "https://ci/%2e%2e/x"}, "evidence_uri: a '..' segment"),
        ({"started_at": "2026-11-25T09:00:00"}, "started_at"),
        (
            {"started_at": "2026-11-25T10:00:00Z", "finished_at": "2026-11-25T09:00:00Z"},
            "started_at is after finished_at",
        ),
        ({"finished_at": "2999-01-01T00:00:00Z"}, "finished_at: 2999-01-01T00:00:00+00:00 is in"),
        ({"extra": 1}, "extra"),
        ({"model": ""}, "model"),
    ],
)
def test_a_bad_report_is_400_recorded_and_spends_the_token(
    client: TestClient, broker: Broker, change: dict[str, Any], where: str
) -> None:
    token = drill_token(broker)
    body = {"model": "llama-7b", "rollback_point": POINT, "result": "passed", **change}
    resp = client.post("/v1/rollback-tests", json=body, headers=bearer(token))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_request"
    assert resp.json()["error_description"].startswith(where), resp.json()
    assert resp.json()["audit_index"] == events(broker, "rollback_test.refused")[0]["idx"]
    assert broker.rollback_tests.find() == []
    assert report_test(client, token).status_code == 401


@pytest.mark.parametrize("body", [[1, 2], "passed", None])
def test_a_body_that_is_not_an_object_is_400(
    client: TestClient, broker: Broker, body: object
) -> None:
    resp = client.post("/v1/rollback-tests", json=body, headers=bearer(drill_token(broker)))
    assert resp.status_code == 400, resp.text


def test_reported_uris_are_normalised_so_they_match_the_request(
    client: TestClient, broker: Broker
) -> None:
    given = {**POINT, "uri": "S3://Models/llama-7b/%77eights/v41"}
    resp = report_test(client, drill_token(broker), point=given)
    assert resp.status_code == 201 and resp.json()["rollback_point"]["uri"] == POINT["uri"]
    approval_id = deploy(client, broker).json()["approval_id"]
    assert approve_twice(client, broker, approval_id).json()["status"] == "approved"


# --- reading -------------------------------------------------------------------------------------


def test_approvers_auditors_and_admins_list_tests_newest_first(
    client: TestClient, broker: Broker
) -> None:
    other = {**POINT, "uri": "s3://models/llama-7b/weights/v40"}
    first = report_test(client, drill_token(broker), point=other).json()
    second = report_test(client, drill_token(broker), result="failed").json()
    for role in ("approver", "auditor", "admin"):
        listed = client.get(
            "/v1/rollback-tests", params={"model": "llama-7b"}, headers=reviewer(broker, "p", role)
        )
        assert listed.status_code == 200
        assert [t["id"] for t in listed.json()["rollback_tests"]] == [second["id"], first["id"]]
    only = client.get(
        "/v1/rollback-tests",
        params={"uri": other["uri"]},
        headers=reviewer(broker, "p", "auditor"),
    ).json()["rollback_tests"]
    assert [t["id"] for t in only] == [first["id"]]
    none = client.get(
        "/v1/rollback-tests", params={"model": "mistral-7b"}, headers=reviewer(broker, "p", "admin")
    )
    assert none.json()["rollback_tests"] == []


def test_others_cannot_list_tests(client: TestClient, broker: Broker) -> None:
    assert client.get("/v1/rollback-tests").status_code == 401
    workload = client.get("/v1/rollback-tests", headers=bearer(drill_token(broker)))
    assert workload.status_code == 401
    nobody = client.get("/v1/rollback-tests", headers=reviewer(broker, "p", "nothing"))
    assert nobody.status_code == 403


# --- the gate ------------------------------------------------------------------------------------


def test_a_recorded_passed_test_of_the_rollback_point_opens_the_gate(
    client: TestClient, broker: Broker
) -> None:
    approval_id = deploy(client, broker).json()["approval_id"]
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409 and gate.json()["error"] == "rollback_untested"
    assert (
        "no rollback test of s3://models/llama-7b/weights/v41" in gate.json()["error_description"]
    )

    assert report_test(client, drill_token(broker)).status_code == 201
    assert approve_twice(client, broker, approval_id).json()["status"] == "approved"
    issued = deploy(client, broker, approval_id=approval_id)
    assert issued.status_code == 200, issued.text


@pytest.mark.parametrize(
    ("tested", "missing"),
    [
        ({"result": "failed"}, "the newest recorded rollback test of"),
        ({"point": {**POINT, "sha256": "cd" * 32}}, "no rollback test of"),
        ({"point": {**POINT, "uri": "s3://models/llama-7b/weights/v40"}}, "no rollback test of"),
    ],
)
def test_only_a_passed_test_of_exactly_the_point_counts(
    client: TestClient, broker: Broker, tested: dict[str, Any], missing: str
) -> None:
    assert report_test(client, drill_token(broker), **tested).status_code == 201
    approval_id = deploy(client, broker).json()["approval_id"]
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409, gate.text
    assert missing in gate.json()["error_description"]


def test_a_test_older_than_the_maximum_age_does_not_count(
    client: TestClient, broker: Broker
) -> None:
    max_age = broker.policy.policy.approval.rollback_test_max_age
    real = broker.rollback_tests.clock
    broker.rollback_tests.clock = lambda: real() - dt.timedelta(seconds=max_age + 60)
    assert report_test(client, drill_token(broker)).status_code == 201
    broker.rollback_tests.clock = real
    approval_id = deploy(client, broker).json()["approval_id"]
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409 and "rollback_test_max_age" in gate.json()["error_description"]
    # Nor does a fresh report of a test that says it finished long ago.
    long_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=max_age + 60)).isoformat()
    assert report_test(client, drill_token(broker), finished_at=long_ago).status_code == 201
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409 and "rollback_test_max_age" in gate.json()["error_description"]


def test_a_test_reported_by_the_same_person_as_the_requester_does_not_count(
    client: TestClient, broker: Broker
) -> None:
    """alice (``people``: ``actor: alice`` on dev tokens) triggered both the release and the
    drill: she does not vouch for her own rollback."""
    assert report_test(client, drill_token(broker, actor="alice")).status_code == 201
    token = releaser(broker, actor="alice")
    approval_id = deploy(client, broker, token).json()["approval_id"]
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409, gate.text
    assert "the same person: alice" in gate.json()["error_description"]
    # A drill that carol triggered counts.
    assert report_test(client, drill_token(broker, actor="carol")).status_code == 201
    assert approve_twice(client, broker, approval_id).json()["status"] == "approved"


@pytest.fixture
def self_testing(tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    """The example policy, where the release workflow may also report rollback tests."""
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/"
    )
    mine = "actions: [deploy-weights, edit-safety-filter]"
    assert mine in text
    policy = tmp_path / "policy.yaml"
    policy.write_text(text.replace(mine, mine.replace("]", ", rollback-test]")))
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def test_a_test_the_requester_reported_itself_does_not_count(
    self_testing: tuple[TestClient, Broker],
) -> None:
    client, broker = self_testing
    recorded = report_test(client, releaser(broker))
    assert recorded.status_code == 201 and recorded.json()["reporter"]["subject"] == RELEASE
    approval_id = deploy(client, broker).json()["approval_id"]
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409, gate.text
    assert "reported by the requester itself" in gate.json()["error_description"]
    assert report_test(client, drill_token(broker)).status_code == 201
    assert approve_twice(client, broker, approval_id).json()["status"] == "approved"


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        (
            ("rollback-test:      {tier: low,        max_ttl: 15m}", ""),
            "the policy has no action rollback-test",
        ),
        (
            (
                "rollback-test:      {tier: low,        max_ttl: 15m}",
                "rollback-test:      {tier: elevated,   max_ttl: 15m, approvals: 1}",
            ),
            "action rollback-test is tier elevated",
        ),
    ],
)
def test_a_policy_without_a_low_tier_rollback_test_action_records_no_tests(
    tmp_path: Path, edit: tuple[str, str], refusal: str
) -> None:
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/"
    )
    assert edit[0] in text
    text = text.replace(edit[0], edit[1])
    if not edit[1]:
        text = text.replace("    actions: [rollback-test]\n", "    actions: [evaluate]\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    with TestClient(create_app(broker=broker)) as client:
        resp = report_test(client, drill_token(broker))
        assert resp.status_code == 403, resp.text
        assert refusal in resp.json()["error_description"]
        assert broker.rollback_tests.find() == []
        assert [e["error"] for e in events(broker, "rollback_test.refused")] == ["access_denied"]
