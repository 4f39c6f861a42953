"""ApprovalService's checks at the moment an approval is used: the rollback gate again (a
recorded test that went stale or failed since), and the binding once more in the single-use
UPDATE itself (for a check that saw another state)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.approvals.rules import Binding
from broker.errors import Conflict
from broker.runtime import Broker
from tests.approvals.support import drill_token, point_lineage, report_test
from tests.approvals.test_flow import ask, releaser, review
from tests.conftest import exchange_form
from tests.faults import grant_statuses


def deploy(client: TestClient, broker: Broker, lineage: str, **form: str) -> Any:
    data = exchange_form(releaser(broker), action="deploy-weights", lineage=lineage, **form)
    return client.post("/v1/token", data=data)


def approve_deploy(client: TestClient, broker: Broker, lineage: str) -> str:
    approval_id = deploy(client, broker, lineage).json()["approval_id"]
    for person in ("bob@example.com", "carol@example.com"):
        assert review(client, broker, approval_id, "approve", person).status_code == 200
    assert broker.approvals.get(approval_id)["status"] == "approved"
    return str(approval_id)


def approved_binding(broker: Broker, approval_id: str) -> Binding:
    """The binding the approval was given for, as stored with it."""
    return Binding(**broker.approvals.get(approval_id)["bound"])


def test_a_rollback_test_gone_stale_since_the_approval_is_refused_at_use(
    client: TestClient, broker: Broker
) -> None:
    settings = broker.policy.policy.approval
    assert settings.rollback_test_max_age > 3600 > 1800 and settings.approved_ttl == 3600
    # Recorded fresh at review time, with ten minutes to spare; the approval stays valid for
    # an hour.
    real = broker.rollback_tests.clock
    age = dt.timedelta(seconds=settings.rollback_test_max_age - 600)
    broker.rollback_tests.clock = lambda: real() - age
    assert report_test(client, drill_token(broker)).status_code == 201
    broker.rollback_tests.clock = real
    lineage = point_lineage()
    approval_id = approve_deploy(client, broker, lineage)

    real_clock = broker.approvals.clock
    broker.approvals.clock = lambda: real_clock() + dt.timedelta(minutes=30)
    stale = deploy(client, broker, lineage, approval_id=approval_id)
    assert stale.status_code == 403, stale.text
    assert stale.json()["error"] == "approval_required" and "access_token" not in stale.text
    assert "rollback_test_max_age" in stale.json()["error_description"]
    assert broker.approvals.get(approval_id)["status"] == "approved"  # not spent
    assert grant_statuses(broker) == {}

    # The same exchange, with the test still fresh, is what the approval covers.
    broker.approvals.clock = real_clock
    assert deploy(client, broker, lineage, approval_id=approval_id).status_code == 200


def test_a_failed_rollback_test_recorded_since_the_approval_is_refused_at_use(
    client: TestClient, broker: Broker
) -> None:
    assert report_test(client, drill_token(broker)).status_code == 201
    lineage = point_lineage()
    approval_id = approve_deploy(client, broker, lineage)
    assert report_test(client, drill_token(broker), result="failed").status_code == 201

    refused = deploy(client, broker, lineage, approval_id=approval_id)
    assert refused.status_code == 403, refused.text
    assert "the newest recorded rollback test of" in refused.json()["error_description"]
    assert grant_statuses(broker) == {}
    assert report_test(client, drill_token(broker)).status_code == 201
    assert deploy(client, broker, lineage, approval_id=approval_id).status_code == 200


def test_consume_updates_only_the_approval_of_exactly_this_binding(
    client: TestClient, broker: Broker
) -> None:
    approval_id = ask(client, broker).json()["approval_id"]
    review(client, broker, approval_id, "approve", "bob@example.com")
    binding = approved_binding(broker, approval_id)
    other = dataclasses.replace(binding, reason="a different job")
    assert other.digest() != binding.digest()

    with (
        pytest.raises(Conflict, match="used or expired meanwhile"),
        broker.store.write() as session,
    ):
        broker.approvals.consume(session, approval_id, other, "g_other")
    assert broker.approvals.get(approval_id)["status"] == "approved"

    with broker.store.write() as session:
        broker.approvals.consume(session, approval_id, binding, "g_this")
    view = broker.approvals.get(approval_id)
    assert (view["status"], view["grant_id"]) == ("used", "g_this")


def test_exchange_whose_check_saw_the_approved_binding_still_cannot_use_it_for_another(
    client: TestClient, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race consume's WHERE closes: the usability check passed for the approved binding,
    yet the exchange that reaches consume is bound to another (here: another reason). The
    check is made to evaluate the approved binding, as a check against other state would."""
    approval_id = ask(client, broker).json()["approval_id"]
    review(client, broker, approval_id, "approve", "bob@example.com")
    binding = approved_binding(broker, approval_id)
    check = broker.approvals.unusable_because
    seen: list[str | None] = []

    def checked_against_the_approved_binding(approval: str, _requested: Binding) -> str | None:
        seen.append(check(approval, binding))
        return seen[-1]

    monkeypatch.setattr(broker.approvals, "unusable_because", checked_against_the_approved_binding)
    resp = ask(client, broker, approval_id=approval_id, reason="a different job")
    assert seen == [None]  # the check passed
    assert resp.status_code == 409, resp.text
    assert "access_token" not in resp.text
    assert grant_statuses(broker) == {}
    assert broker.approvals.get(approval_id)["status"] == "approved"


def _person(broker: Broker, sub: str, *roles: str) -> Any:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=sub, roles=list(roles or ("approver",)))
    return broker.verifier.verify_person(token)


def test_refusal_answers_what_review_would_raise(client: TestClient, broker: Broker) -> None:
    """The console offers approve and deny by refusal(); it must agree with review()."""
    approval_id = deploy(client, broker, point_lineage()).json()["approval_id"]
    service = broker.approvals
    bob, auditor = _person(broker, "bob@example.com"), _person(broker, "ann", "auditor")
    # The rollback gate refuses an approve only; a deny is still open to bob.
    untested = service.refusal(approval_id, bob, "approve")
    assert untested is not None and untested.code == "rollback_untested"
    assert service.refusal(approval_id, bob, "deny") is None
    role = service.refusal(approval_id, auditor, "deny")
    assert role is not None and role.status == 403 and "needs role approver" in role.description
    with pytest.raises(type(untested)):
        service.review(approval_id, bob, "approve", "x")
    service.review(approval_id, bob, "deny", "not tested")
    final = service.refusal(approval_id, _person(broker, "carol@example.com"), "deny")
    assert isinstance(final, Conflict) and "already denied" in final.description
