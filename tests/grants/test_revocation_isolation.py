"""The revocation queue: one backend call that raises does not stop the jobs behind it."""

from __future__ import annotations

import datetime as dt
import json

from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.backends.base import TOKEN_TYPE_JWT, BackendRegistry, Credential
from broker.grants.model import Grant
from broker.runtime import Broker
from broker.store.tables import EventRow
from tests.conftest import eval_token, exchange_form, person_token


class FlakyRevoker:
    """Our own Backend interface: revoking the grants in ``broken`` raises a bug."""

    name = "jwt"
    token_type = TOKEN_TYPE_JWT
    external = False

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken

    def issue(self, grant: Grant) -> Credential:
        raise AssertionError("not used here")

    def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
        if grant.id in self.broken:
            raise RuntimeError("a bug")
        return True


def test_a_revocation_that_raises_is_retried_and_holds_up_no_other(
    client: TestClient, broker: Broker
) -> None:
    ids = [
        client.post("/v1/token", data=exchange_form(eval_token(broker))).json()["grant_id"]
        for _ in range(3)
    ]
    flaky = FlakyRevoker(broken={ids[0]})  # the first job in id order
    broker.grants.backends = BackendRegistry({"jwt": flaky})
    admin = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}

    resp = client.post("/v1/revocations", json={"model": "llama-7b", "reason": "x"}, headers=admin)

    assert resp.status_code == 200 and sorted(resp.json()["revoked"]) == sorted(ids)
    states = {g: broker.grants.get(g).backend_revocation for g in ids}
    assert states == {ids[0]: "pending", ids[1]: "confirmed", ids[2]: "confirmed"}
    with broker.store.read() as s:
        failed = [
            json.loads(e.body)
            for e in s.scalars(select(EventRow).where(EventRow.grant_id == ids[0]))
            if e.type == "grant.backend_revocation_failed"
        ]
    assert failed[0]["error"] == "the jwt backend failed unexpectedly (RuntimeError)"
    assert "retry_at" in failed[0]

    flaky.broken.clear()
    later = broker.grants.clock() + dt.timedelta(minutes=1)
    broker.grants.revocations.clock = lambda: later
    assert broker.grants.revocations.process() == 1
    assert broker.grants.get(ids[0]).backend_revocation == "confirmed"
