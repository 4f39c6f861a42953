from __future__ import annotations
from pathlib import Path
from fastapi.testclient import TestClient
from sqlalchemy import select
from broker.api.app import create_app
from broker.store.tables import RevocationRow
from tests.backends.vault.conftest import VaultSetup
from tests.backends.vault.test_vault_exchange import make_broker, admin, VAULT, approved_fine_tune
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, exchange_form
from tests.servers import Postgres, free_port_pair
import datetime as dt

def test_repro(tmp_path: Path, vault: VaultSetup, database: Postgres) -> None:
    data = tmp_path / "data"
    first = make_broker(data, vault)
    with TestClient(create_app(broker=first)) as client:
        w = first.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
        body = client.post("/v1/token", data=exchange_form(w, requested_token_type=VAULT)).json()
        issued = approved_fine_tune(client, first)
    dead = f"http://127.0.0.1:{free_port_pair()}"
    second = make_broker(data, vault, addr=dead)
    with TestClient(create_app(broker=second)) as client:
        r = client.post("/v1/revocations", json={"model": "llama-7b", "reason": "x"}, headers=admin(second))
        print(r.json())
    third = make_broker(data, vault)
    try:
        print(third.grants.revocations.reconcile(min_age_s=0))
        later = third.grants.clock() + dt.timedelta(minutes=5)
        third.grants.revocations.clock = lambda: later
        third.maintain()
        with third.store.read() as s:
            for j in s.scalars(select(RevocationRow)):
                print(j.grant_id, j.credential_ref, j.status, j.last_error)
    finally:
        third.close()
    assert False
