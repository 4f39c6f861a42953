"""Break-glass (issue 17): an emergency use is issued at once with the capped TTL, loudly (its
own event, a signed webhook, a metric), opens its review, is flagged when not ratified in
time, is capped per identity in the store, and gives no credential if it cannot be recorded."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from standardwebhooks import Webhook

from broker.api.app import create_app
from broker.backends.base import TOKEN_TYPE_VAULT, BackendRegistry
from broker.cli.main import main
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from broker.store.tables import EventRow, GrantRow
from tests.approvals.test_webhook import Receiver, new_secret, receiver  # noqa: F401
from tests.conftest import exchange_form, person_token
from tests.faults import inserts_blocked
from tests.grants.support import FakeBackend
from tests.vendor import VENDOR_SUB, vendor_policy

REASON = "INC-4711: the serving weights are corrupt"


@pytest.fixture
def hooked(
    tmp_path: Path,
    receiver: tuple[Receiver, str],  # noqa: F811
) -> Iterator[tuple[TestClient, Broker, Receiver, str]]:
    hook, url = receiver
    secret = new_secret()
    (tmp_path / "webhook-secret").write_text(secret + "\n")
    policy = vendor_policy(tmp_path, webhook=url)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    broker.notifier._backoff = 0.01  # type: ignore[union-attr]
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker, hook, secret


def vendor_token(broker: Broker, sub: str = VENDOR_SUB) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=sub)


def emergency(client: TestClient, broker: Broker, **form: str) -> Any:
    fields = {"emergency": "true", "reason": REASON, **form}
    data = exchange_form(vendor_token(broker), model="vendor-llm", action="hotfix", **fields)
    return client.post("/v1/token", data=data)


def events(broker: Broker, *types: str) -> list[dict[str, Any]]:
    with broker.store.read() as s:
        rows = s.scalars(select(EventRow).where(EventRow.type.in_(types)).order_by(EventRow.idx))
        return [json.loads(r.body) for r in rows]


def approve(client: TestClient, broker: Broker, approval_id: str, *people: str) -> Any:
    resp = None
    for sub in people:
        headers = {"Authorization": f"Bearer {person_token(broker, 'approver', sub=sub)}"}
        resp = client.post(
            f"/v1/approvals/{approval_id}/approve", json={"reason": "ok"}, headers=headers
        )
        assert resp.status_code == 200, resp.text
    return resp


def test_an_emergency_use_is_issued_at_once_capped_and_loud(
    hooked: tuple[TestClient, Broker, Receiver, str],
) -> None:
    client, broker, hook, secret = hooked
    # Without emergency, the privileged action waits for two approvals.
    waiting = client.post(
        "/v1/token",
        data=exchange_form(vendor_token(broker), model="vendor-llm", action="hotfix"),
    )
    assert waiting.status_code == 403 and waiting.json()["error"] == "approval_required"

    resp = emergency(client, broker)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["expires_in"] == 600  # ttl_cap 10m, under the tier's 15m and the action's 1h
    review = body["emergency"]
    assert review["ttl_seconds"] == 600 and review["approval_id"].startswith("a_")

    [allowed] = [e for e in events(broker, "exchange.allowed") if e.get("emergency")]
    [used] = events(broker, "emergency.used")
    assert allowed["grant_id"] == used["grant_id"] == body["grant_id"]
    assert used["reason"] == REASON and used["approval_id"] == review["approval_id"]
    assert used["identity"] == {"issuer": "dev", "subject": VENDOR_SUB}
    assert used["ratify_by"] == review["ratify_by"]

    # The review request: pending, two approvals as the tier says, never usable for an exchange.
    view = client.get(
        f"/v1/approvals/{review['approval_id']}",
        headers={"Authorization": f"Bearer {person_token(broker, 'auditor')}"},
    ).json()
    assert (view["status"], view["approvals_required"]) == ("pending", 2)
    assert view["bound"]["emergency_grant"] == body["grant_id"]

    metrics = client.get("/metrics").text
    assert 'broker_emergency_uses_total{action="hotfix",model="vendor-llm"} 1.0' in metrics

    assert broker.notifier is not None
    broker.notifier.close()
    got = [Webhook(secret).verify(r.body, r.headers) for r in hook.received]
    assert [g["event"] for g in got][-2:] == ["emergency.used", "approval.requested"]
    assert got[-2]["approval"]["emergency"]["grant_id"] == body["grant_id"]
    assert body["access_token"] not in b"".join(r.body for r in hook.received).decode()


@pytest.mark.parametrize(
    ("form", "status", "said"),
    [
        ({"reason": ""}, 400, "emergency: a reason is required"),
        ({"emergency": "yes"}, 400, "emergency: expected true or false"),
        ({"approval_id": "ap_x"}, 400, "emergency: give no approval_id"),
        ({"scope": "evaluate"}, 400, "emergency: action evaluate needs no approval"),
        ({"scope": "fine-tune"}, 403, "action fine-tune allows no emergency use"),
    ],
)
def test_what_an_emergency_request_needs(
    hooked: tuple[TestClient, Broker, Receiver, str],
    form: dict[str, str],
    status: int,
    said: str,
) -> None:
    client, broker, _, _ = hooked
    resp = emergency(client, broker, **form)
    assert resp.status_code == status and said in resp.json()["error_description"], resp.text
    assert events(broker, "emergency.used") == []


def test_a_rule_is_still_needed(hooked: tuple[TestClient, Broker, Receiver, str]) -> None:
    client, broker, _, _ = hooked
    data = exchange_form(
        vendor_token(broker, sub="repo:someone/else:ref:refs/heads/main"),
        model="vendor-llm",
        action="hotfix",
        emergency="true",
        reason=REASON,
    )
    resp = client.post("/v1/token", data=data)
    assert resp.status_code == 403 and resp.json()["error"] == "access_denied"
    assert events(broker, "emergency.used") == []


def test_the_cap_per_identity_is_counted_in_the_store(tmp_path: Path) -> None:
    policy = vendor_policy(tmp_path)
    settings = Settings(dev=True, data_dir=tmp_path / "d", policy=policy)
    broker = build_broker(settings)
    with TestClient(create_app(broker=broker)) as client:
        assert emergency(client, broker).status_code == 200
        assert emergency(client, broker).status_code == 200
        third = emergency(client, broker)
        assert third.status_code == 403
        assert "used its 2 emergency use(s) within 86400s" in third.json()["error_description"]
    # A new broker process on the same store (a restart, another replica) counts the same.
    again = build_broker(settings)
    with TestClient(create_app(broker=again)) as client:
        assert emergency(client, again).status_code == 403
        real = again.grants.clock
        again.grants.emergency.clock = again.grants.clock = lambda: real() + dt.timedelta(hours=25)
        assert emergency(client, again).status_code == 200  # the window moved on
    assert len(events(again, "emergency.used")) == 3
    again.close()


@pytest.mark.parametrize("table", ["events", "emergency_uses", "approval_requests"])
def test_no_credential_when_the_use_cannot_be_recorded(
    hooked: tuple[TestClient, Broker, Receiver, str], table: str
) -> None:
    """Its events, its count or its review request: any of them failing means no credential."""
    client, broker, hook, _ = hooked
    with inserts_blocked(broker, table):
        resp = emergency(client, broker)
    assert resp.status_code == 503 and "access_token" not in resp.text
    assert events(broker, "emergency.used", "approval.requested") == []
    assert [e for e in events(broker, "exchange.allowed") if e.get("emergency")] == []
    with broker.store.read() as s:
        assert s.scalars(select(GrantRow).where(GrantRow.action == "hotfix")).all() == []
    assert broker.notifier is not None
    broker.notifier.close()
    assert hook.received == []  # nothing announced what did not happen


def test_ratified_in_time_or_flagged(hooked: tuple[TestClient, Broker, Receiver, str]) -> None:
    client, broker, hook, secret = hooked
    ratified = emergency(client, broker).json()["emergency"]
    late = emergency(client, broker).json()
    approve(client, broker, ratified["approval_id"], "bob@example.com", "carol@example.com")
    broker.maintain()
    [ok] = events(broker, "emergency.ratified")
    assert ok["approval_id"] == ratified["approval_id"]
    assert events(broker, "emergency.unratified") == []
    assert "notices" not in client.get("/readyz").json()

    # The other one's hour runs out with its review still pending.
    real = broker.grants.emergency.clock
    broker.grants.emergency.clock = lambda: real() + dt.timedelta(hours=1, minutes=1)
    broker.maintain()
    [flagged] = events(broker, "emergency.unratified")
    assert flagged["grant_id"] == late["grant_id"]
    assert flagged["why"].startswith("the review request is pending at the deadline")
    notice = client.get("/readyz").json()["notices"]["emergency"]
    assert notice.startswith("1 emergency use(s) not ratified") and late["grant_id"] in notice
    metrics = client.get("/metrics").text
    assert 'broker_emergency_unratified_total{action="hotfix",model="vendor-llm"} 1.0' in metrics
    broker.maintain()  # settled once: no second event
    assert len(events(broker, "emergency.unratified")) == 1
    assert broker.notifier is not None
    broker.notifier.close()
    got = [Webhook(secret).verify(r.body, r.headers)["event"] for r in hook.received]
    assert got.count("emergency.unratified") == 1
    # The tables still say what the log says (the review requests, the grants).
    data_dir = str(broker.settings.data_dir)
    assert main(["audit", "verify", "--data-dir", data_dir]) == 0


def test_a_denied_review_flags_the_use_at_once(
    hooked: tuple[TestClient, Broker, Receiver, str],
) -> None:
    client, broker, _, _ = hooked
    use = emergency(client, broker).json()["emergency"]
    headers = {"Authorization": f"Bearer {person_token(broker, 'approver', sub='bob@x')}"}
    denied = client.post(
        f"/v1/approvals/{use['approval_id']}/deny", json={"reason": "no"}, headers=headers
    )
    assert denied.status_code == 200, denied.text
    broker.maintain()
    [flagged] = events(broker, "emergency.unratified")
    assert flagged["why"].startswith("the review request ended denied")


def test_an_approved_review_covers_no_exchange(
    hooked: tuple[TestClient, Broker, Receiver, str],
) -> None:
    client, broker, _, _ = hooked
    use = emergency(client, broker).json()["emergency"]
    approve(client, broker, use["approval_id"], "bob@example.com", "carol@example.com")
    again = client.post(
        "/v1/token",
        data=exchange_form(
            vendor_token(broker),
            model="vendor-llm",
            action="hotfix",
            reason=REASON,
            approval_id=use["approval_id"],
        ),
    )
    assert again.status_code == 403 and again.json()["error"] == "approval_required"


def test_an_external_backends_credential_is_revoked_when_the_use_cannot_be_recorded(
    hooked: tuple[TestClient, Broker, Receiver, str],
) -> None:
    client, broker, _, _ = hooked
    fake = FakeBackend()
    broker.grants.backends = BackendRegistry(
        {"jwt": broker.grants.backends.get("jwt"), "vault": fake}
    )
    issued = emergency(client, broker, requested_token_type=TOKEN_TYPE_VAULT)
    assert issued.status_code == 200, issued.text
    grant_id = issued.json()["grant_id"]
    assert fake.live == {grant_id: f"ref-{grant_id}"}
    assert str(broker.grants.get(grant_id).status) == "active"

    with inserts_blocked(broker, "emergency_uses"):
        refused = emergency(client, broker, requested_token_type=TOKEN_TYPE_VAULT)
    assert refused.status_code == 503 and "access_token" not in refused.text
    [failed] = [g for g in broker.grants.find() if g.id != grant_id]
    assert str(failed.status) == "failed"
    assert fake.live == {grant_id: f"ref-{grant_id}"}  # what it issued for the refusal is gone
    assert (failed.id, f"ref-{failed.id}") in fake.revoked
    assert len(events(broker, "emergency.used")) == 1


def test_a_replica_that_does_not_settle_uses_still_shows_the_notice(
    hooked: tuple[TestClient, Broker, Receiver, str], tmp_path: Path
) -> None:
    """Only the maintenance lease holder settles uses; every replica's /readyz says so."""
    client, holder, _, _ = hooked
    late = emergency(client, holder).json()
    holder.maintain()  # takes the lease
    other = build_broker(holder.settings)  # a second process on the same store
    try:
        real = holder.grants.emergency.clock
        for b in (holder, other):
            b.grants.emergency.clock = lambda: real() + dt.timedelta(hours=1, minutes=1)
        holder.maintain()
        assert [e["grant_id"] for e in events(holder, "emergency.unratified")] == [late["grant_id"]]
        assert other.maintenance.hold() is None  # not the holder: it settles nothing
        other.maintain()
        assert late["grant_id"] in other.notices()["emergency"]
    finally:
        other.close()
    assert holder.notifier is not None
    holder.notifier.close()
