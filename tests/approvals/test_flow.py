"""Approval flows through the API: the cases the issue names, end to end on a dev broker."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fastapi.testclient import TestClient

from broker.backends.base import BackendRegistry, Credential
from broker.grants.model import Grant
from broker.runtime import Broker
from tests.approvals.support import POINT, drill_token, point_lineage, report_test
from tests.conftest import eval_token, exchange_form, person_token

TRAINER = "system:serviceaccount:training:trainer"
K8S = {
    "kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "trainer", "uid": "u-1"}}
}
RELEASE = "repo:acme/release:ref:refs/heads/main"
DEPLOY_WF = "acme/workflows/.github/workflows/deploy.yml@refs/heads/main"


def trainer(broker: Broker, **claims: object) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=TRAINER, claims={**K8S, **claims})


def releaser(broker: Broker, **claims: object) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=RELEASE, claims={"job_workflow_ref": DEPLOY_WF, **claims})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reviewer(broker: Broker, sub: str, *roles: str) -> dict[str, str]:
    return bearer(person_token(broker, *(roles or ("approver",)), sub=sub))


def review(
    client: TestClient, broker: Broker, approval_id: str, verb: str, sub: str, *roles: str
) -> Any:
    return client.post(
        f"/v1/approvals/{approval_id}/{verb}",
        json={"reason": f"{verb} by {sub}"},
        headers=reviewer(broker, sub, *roles),
    )


LINEAGE = json.dumps({"datasets": [{"uri": "s3://datasets/approved/set-1"}]})


def ask(client: TestClient, broker: Broker, **form: str) -> Any:
    form.setdefault("lineage", LINEAGE)
    return client.post("/v1/token", data=exchange_form(trainer(broker), action="fine-tune", **form))


def test_exchange_opens_a_request_then_an_approval_is_used_once(
    client: TestClient, broker: Broker
) -> None:
    first = ask(client, broker)
    assert first.status_code == 403 and first.json()["error"] == "approval_required"
    approval_id = first.json()["approval_id"]
    assert "0 of 1" in first.json()["error_description"]
    # Asking again for exactly the same thing returns the same pending request.
    assert ask(client, broker).json()["approval_id"] == approval_id

    resp = review(client, broker, approval_id, "approve", "bob@example.com")
    assert resp.status_code == 200 and resp.json()["status"] == "approved"

    issued = ask(client, broker, approval_id=approval_id)
    assert issued.status_code == 200, issued.text
    admin = reviewer(broker, "root@example.com", "admin")
    grant = client.get(f"/v1/grants/{issued.json()['grant_id']}", headers=admin).json()
    assert grant["approval_id"] == approval_id and grant["lineage"]["datasets"][0]["uri"].endswith(
        "set-1"
    )
    assert client.get(f"/v1/approvals/{approval_id}", headers=admin).json()["status"] == "used"

    again = ask(client, broker, approval_id=approval_id)
    assert again.status_code == 403 and "is used" in again.json()["error_description"]
    # Naming a used approval opens no new request; the description says how to ask for one.
    assert "approval_id" not in again.json() and "no request was opened" in again.text
    assert [a["id"] for a in client.get("/v1/approvals", headers=admin).json()["approvals"]] == [
        approval_id
    ]


def test_threshold_two_needs_two_distinct_approvers(client: TestClient, broker: Broker) -> None:
    lineage = {"rollback_point": POINT}
    assert report_test(client, drill_token(broker)).status_code == 201
    token = releaser(broker)
    opened = client.post(
        "/v1/approvals",
        json={"model": "llama-7b", "action": "deploy-weights", "lineage": lineage},
        headers=bearer(token),
    )
    assert opened.status_code == 201, opened.text
    approval_id = opened.json()["id"]
    assert (
        review(client, broker, approval_id, "approve", "bob@example.com").json()["status"]
        == "pending"
    )
    twice = review(client, broker, approval_id, "approve", "bob@example.com")
    assert twice.status_code == 409 and "counts once" in twice.json()["error_description"]
    done = review(client, broker, approval_id, "approve", "carol@example.com").json()
    assert done["status"] == "approved" and done["approvals"] == 2
    resp = client.post(
        "/v1/token",
        data=exchange_form(
            releaser(broker),
            action="deploy-weights",
            lineage=json.dumps(lineage),
            approval_id=approval_id,
        ),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] == 900  # privileged: 15m


def test_one_deny_resolves_and_later_approvals_do_nothing(
    client: TestClient, broker: Broker
) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    assert (
        review(client, broker, approval_id, "deny", "dave@example.com").json()["status"] == "denied"
    )
    late = review(client, broker, approval_id, "approve", "bob@example.com")
    assert late.status_code == 409 and "already denied" in late.json()["error_description"]
    assert ask(client, broker, approval_id=approval_id).status_code == 403


def test_approval_does_not_cover_different_lineage_or_backend(
    client: TestClient, broker: Broker
) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    review(client, broker, approval_id, "approve", "bob@example.com")
    other = json.dumps({"datasets": [{"uri": "s3://datasets/approved/set-2"}]})
    resp = ask(client, broker, approval_id=approval_id, lineage=other)
    assert resp.status_code == 403
    assert "lineage.datasets: approved [" in resp.json()["error_description"]

    class FakeVault:  # our own Backend Protocol, to show the binding covers the backend
        name, token_type, external = "vault", "urn:broker:token-type:vault-token", False

        def issue(self, grant: Grant) -> Credential:
            return Credential("v", self.token_type, "Bearer", grant.expires_at, grant.id)

        def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
            return True

    jwt_backend = broker.grants.backends.get("jwt")
    broker.grants.backends = BackendRegistry({"jwt": jwt_backend, "vault": FakeVault()})
    resp = ask(client, broker, approval_id=approval_id, requested_token_type=FakeVault.token_type)
    assert resp.status_code == 403
    assert "backend: approved 'jwt', requested 'vault'" in resp.json()["error_description"]
    assert (
        ask(client, broker, approval_id=approval_id).status_code == 200
    )  # the approved one still works


def test_self_approval_through_a_second_identity_is_refused(
    client: TestClient, broker: Broker
) -> None:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=TRAINER, claims={**K8S, "actor": "alice"})
    approval_id = client.post(
        "/v1/token", data=exchange_form(token, action="fine-tune", lineage=LINEAGE)
    ).json()["approval_id"]
    resp = review(client, broker, approval_id, "approve", "alice@example.com")
    assert resp.status_code == 403 and "own request" in resp.json()["error_description"]
    assert (
        review(client, broker, approval_id, "approve", "bob@example.com").json()["status"]
        == "approved"
    )


def test_reviewer_without_the_approver_role_is_refused(client: TestClient, broker: Broker) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    resp = review(client, broker, approval_id, "approve", "eve@example.com", "auditor")
    assert resp.status_code == 403 and "needs role approver" in resp.json()["error_description"]
    assert (
        client.post(f"/v1/approvals/{approval_id}/approve", json={"reason": "x"}).status_code == 401
    )


def test_rollback_gate_names_what_is_missing(client: TestClient, broker: Broker) -> None:
    resp = client.post("/v1/token", data=exchange_form(releaser(broker), action="deploy-weights"))
    approval_id = resp.json()["approval_id"]
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409 and gate.json()["error"] == "rollback_untested"
    assert "lineage.rollback_point is missing" in gate.json()["error_description"]


def test_rollback_evidence_the_requester_wrote_itself_does_not_pass_the_gate(
    client: TestClient, broker: Broker
) -> None:
    """The reproduced case: a passed, fresh ``rollback_point.test`` in the requester's own
    lineage satisfied the gate. It is kept as information; the gate wants a recorded test."""
    now = dt.datetime.now(dt.UTC).isoformat()
    lineage = point_lineage(test={"ref": "ci://rb/1", "result": "passed", "tested_at": now})
    form = exchange_form(releaser(broker), action="deploy-weights", lineage=lineage)
    approval_id = client.post("/v1/token", data=form).json()["approval_id"]
    kept = broker.approvals.get(approval_id)["bound"]["lineage"]["rollback_point"]["test"]
    assert (kept["ref"], kept["result"]) == ("ci://rb/1", "passed")
    gate = review(client, broker, approval_id, "approve", "bob@example.com")
    assert gate.status_code == 409 and gate.json()["error"] == "rollback_untested"
    described = gate.json()["error_description"]
    assert "no rollback test of s3://models/llama-7b/weights/v41" in described
    assert broker.approvals.get(approval_id)["reviews"] == []


def test_low_tier_never_asks_for_approval(client: TestClient, broker: Broker) -> None:
    assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 200
    resp = client.post(
        "/v1/approvals",
        json={"model": "llama-7b", "action": "evaluate"},
        headers=bearer(eval_token(broker)),
    )
    assert resp.status_code == 400 and "needs no approval" in resp.json()["error_description"]
    admin = reviewer(broker, "root@example.com", "admin")
    assert client.get("/v1/approvals", headers=admin).json()["approvals"] == []


def test_pending_and_unused_approvals_expire(client: TestClient, broker: Broker) -> None:
    pending = ask(client, broker).json()["approval_id"]
    other = json.dumps({"datasets": [{"uri": "s3://datasets/approved/set-3"}]})
    approved = ask(client, broker, lineage=other).json()["approval_id"]
    review(client, broker, approved, "approve", "bob@example.com")
    real_clock = broker.approvals.clock
    broker.approvals.clock = lambda: real_clock() + dt.timedelta(hours=2)  # past approved_ttl 1h
    admin = reviewer(broker, "root@example.com", "admin")
    assert client.get(f"/v1/approvals/{approved}", headers=admin).json()["status"] == "expired"
    assert ask(client, broker, approval_id=approved, lineage=other).status_code == 403
    assert client.get(f"/v1/approvals/{pending}", headers=admin).json()["status"] == "pending"
    broker.approvals.clock = lambda: real_clock() + dt.timedelta(hours=25)  # past pending_ttl 24h
    assert broker.approvals.expire_due() >= 1
    assert client.get(f"/v1/approvals/{pending}", headers=admin).json()["status"] == "expired"
    late = review(client, broker, pending, "approve", "bob@example.com")
    assert late.status_code == 409


def test_requester_cancels_and_others_cannot(client: TestClient, broker: Broker) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    stranger = client.post(
        f"/v1/approvals/{approval_id}/cancel",
        json={"reason": "x"},
        headers=bearer(eval_token(broker)),
    )
    assert stranger.status_code == 403
    mine = client.post(
        f"/v1/approvals/{approval_id}/cancel",
        json={"reason": "job dropped"},
        headers=bearer(trainer(broker)),
    )
    assert mine.status_code == 200 and mine.json()["status"] == "cancelled"
    assert review(client, broker, approval_id, "approve", "bob@example.com").status_code == 409


def test_datasets_outside_the_rule_are_denied(client: TestClient, broker: Broker) -> None:
    bad = json.dumps({"datasets": [{"uri": "s3://scraped/unvetted"}]})
    resp = ask(client, broker, lineage=bad)
    assert resp.status_code == 403 and resp.json()["error"] == "access_denied"
    assert (
        "dataset" in resp.json()["error_description"]
        and "s3://scraped/unvetted" in resp.json()["error_description"]
    )


def test_lineage_shows_who_changed_the_model(client: TestClient, broker: Broker) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    review(client, broker, approval_id, "approve", "bob@example.com")
    grant_id = ask(client, broker, approval_id=approval_id).json()["grant_id"]
    client.post("/v1/token", data=exchange_form(eval_token(broker)))  # low tier: not lineage
    history = client.get(
        "/v1/lineage/llama-7b", headers=reviewer(broker, "audra@example.com", "auditor")
    ).json()["history"]
    assert [h["id"] for h in history] == [grant_id]
    entry = history[0]
    assert entry["subject"] == TRAINER and entry["action"] == "fine-tune"
    assert entry["reviews"][0]["reviewer"]["subject"] == "bob@example.com"
    assert entry["lineage"]["datasets"][0]["uri"] == "s3://datasets/approved/set-1"
    assert entry["policy_digest"] == broker.policy.digest


def test_every_transition_is_an_audit_event(client: TestClient, broker: Broker) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    review(client, broker, approval_id, "approve", "bob@example.com")
    ask(client, broker, approval_id=approval_id)
    auditor = reviewer(broker, "audra@example.com", "auditor")
    entries = client.get(
        "/v1/audit/entries", params={"start": 0, "end": 100}, headers=auditor
    ).json()["entries"]
    types = [e["event"]["type"] for e in entries if e["event"].get("approval_id") == approval_id]
    assert types == [
        "approval.requested",
        "approval.reviewed",
        "approval.approved",
        "approval.used",
        "exchange.allowed",
    ]


def test_the_token_of_an_approved_exchange_is_spent(client: TestClient, broker: Broker) -> None:
    """A single-use token spent by the approved path too: the same token, the same approval
    id, again → replayed (not "is used": the replay is refused before the approval is read)."""
    approval_id = ask(client, broker).json()["approval_id"]
    assert review(client, broker, approval_id, "approve", "bob@example.com").status_code == 200
    token = trainer(broker)
    form = exchange_form(token, action="fine-tune", lineage=LINEAGE, approval_id=approval_id)
    assert client.post("/v1/token", data=form).status_code == 200
    again = client.post("/v1/token", data=form)
    assert again.status_code == 400, again.text
    assert "token replayed" in again.json()["error_description"]
