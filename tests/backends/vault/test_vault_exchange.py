"""The vault backend wired into the broker: exchange, revocation that reaches Vault (durably,
across restarts), Vault down, and no orphans when the broker dies between Vault and the commit."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hvac.exceptions import Forbidden
from sqlalchemy import select

from broker.api.app import create_app
from broker.backends.base import Credential
from broker.cli.main import main
from broker.grants.model import Grant
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import EventRow, GrantRow, RevocationRow
from tests.backends.vault.conftest import VaultSetup
from tests.conftest import (
    EVAL_SUB,
    EVAL_WORKFLOW,
    LiveServer,
    exchange_form,
    free_port,
    person_token,
    post_concurrently,
)
from tests.servers import Postgres, free_port_pair, wait_until

pytestmark = pytest.mark.integration
VAULT = "urn:broker:token-type:vault-token"
K8S = {
    "kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "trainer", "uid": "u-1"}}
}
TRAINER = "system:serviceaccount:training:trainer"
LINEAGE = json.dumps({"datasets": ["s3://datasets/approved/set-1"]})


def make_broker(data_dir: Path, vault: VaultSetup, addr: str | None = None) -> Broker:
    return build_broker(
        Settings(
            dev=True,
            data_dir=data_dir,
            policy=EXAMPLE_POLICY,
            vault_addr=addr or vault.server.url,
            vault_token=vault.broker_token,
        )
    )


@pytest.fixture
def served(tmp_path: Path, vault: VaultSetup) -> Iterator[tuple[TestClient, Broker]]:
    broker = make_broker(tmp_path / "data", vault)
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def token_alive(vault: VaultSetup, token: str) -> bool:
    try:
        vault.server.client(token).auth.token.lookup_self()
    except Forbidden:
        return False
    return True


def approved_fine_tune(client: TestClient, broker: Broker) -> dict[str, object]:
    """A fine-tune that needs one approval: ask, have bob approve, exchange for a Vault token."""
    assert broker.dev_issuer is not None
    mint = lambda: broker.dev_issuer.mint(sub=TRAINER, claims=K8S)  # noqa: E731
    form = dict(action="fine-tune", lineage=LINEAGE, requested_token_type=VAULT)
    approval_id = client.post("/v1/token", data=exchange_form(mint(), **form)).json()["approval_id"]
    bob = {"Authorization": f"Bearer {person_token(broker, 'approver', sub='bob@example.com')}"}
    assert (
        client.post(
            f"/v1/approvals/{approval_id}/approve", json={"reason": "ok"}, headers=bob
        ).status_code
        == 200
    )
    resp = client.post("/v1/token", data=exchange_form(mint(), approval_id=approval_id, **form))
    assert resp.status_code == 200, resp.text
    body: dict[str, object] = resp.json()
    return body


def admin(broker: Broker) -> dict[str, str]:
    return {"Authorization": f"Bearer {person_token(broker, 'admin', sub='root@example.com')}"}


def test_vault_token_for_an_approved_fine_tune_dies_on_revoke(
    served: tuple[TestClient, Broker], vault: VaultSetup
) -> None:
    client, broker = served
    issued = approved_fine_tune(client, broker)
    token = str(issued["access_token"])
    assert issued["issued_token_type"] == VAULT
    assert token_alive(vault, token)
    meta = vault.server.client(token).auth.token.lookup_self()["data"]["meta"]
    assert meta["grant_id"] == issued["grant_id"] and meta["model"] == "llama-7b"

    resp = client.post(
        f"/v1/grants/{issued['grant_id']}/revoke", json={"reason": "done"}, headers=admin(broker)
    )
    assert resp.status_code == 200 and resp.json()["backend_revocation"] == "confirmed"
    assert not token_alive(vault, token)


def test_database_login_for_evaluate_stops_after_revoke(
    served: tuple[TestClient, Broker], vault: VaultSetup, database: Postgres
) -> None:
    client, broker = served
    assert broker.dev_issuer is not None
    workload = broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
    resp = client.post("/v1/token", data=exchange_form(workload, requested_token_type=VAULT))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert database.login_works(body["username"], body["access_token"])
    client.post(
        f"/v1/grants/{body['grant_id']}/revoke", json={"reason": "done"}, headers=admin(broker)
    )
    assert not database.login_works(body["username"], body["access_token"])


def test_vault_down_answers_503_and_leaves_nothing(tmp_path: Path, vault: VaultSetup) -> None:
    dead = f"http://127.0.0.1:{free_port_pair()}"
    broker = make_broker(tmp_path / "data", vault, addr=dead)
    with TestClient(create_app(broker=broker)) as client:
        assert broker.dev_issuer is not None
        workload = broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
        resp = client.post("/v1/token", data=exchange_form(workload, requested_token_type=VAULT))
        assert resp.status_code == 503
        assert (
            resp.json()["error"] == "temporarily_unavailable"
            and "vault" in resp.json()["error_description"]
        )
        with broker.store.read() as s:
            statuses = [r.status for r in s.scalars(select(GrantRow))]
        assert statuses == ["failed"]
        # jwt exchanges go on while Vault is down.
        ok = broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
        assert client.post("/v1/token", data=exchange_form(ok)).status_code == 200


def test_readyz_names_vault_when_it_is_unreachable(tmp_path: Path, vault: VaultSetup) -> None:
    up = make_broker(tmp_path / "up", vault)
    with TestClient(create_app(broker=up)) as client:
        assert client.get("/readyz").json()["checks"]["vault"] == "ok"
    dead = f"http://127.0.0.1:{free_port_pair()}"
    down = make_broker(tmp_path / "down", vault, addr=dead)
    with TestClient(create_app(broker=down)) as client:
        resp = client.get("/readyz")
        assert resp.status_code == 503
        checks = resp.json()["checks"]
        assert checks["vault"].startswith(f"vault at {dead} is unreachable")
        assert checks["store"] == "ok"
        assert f"vault: vault at {dead}" in resp.json()["error_description"]
        assert client.get("/healthz").status_code == 200


def test_revocation_waits_for_vault_across_restarts(tmp_path: Path, vault: VaultSetup) -> None:
    data = tmp_path / "data"
    first = make_broker(data, vault)
    with TestClient(create_app(broker=first)) as client:
        issued = approved_fine_tune(client, first)
    token = str(issued["access_token"])

    dead = f"http://127.0.0.1:{free_port_pair()}"
    second = make_broker(data, vault, addr=dead)  # a restart while Vault is unreachable
    with TestClient(create_app(broker=second)) as client:
        resp = client.post(
            f"/v1/grants/{issued['grant_id']}/revoke",
            json={"reason": "leak"},
            headers=admin(second),
        )
        assert resp.status_code == 200
        assert resp.json()["status"] == "revoked" and resp.json()["backend_revocation"] == "pending"
    assert token_alive(vault, token)  # not yet: Vault never heard of it

    third = make_broker(data, vault)  # restart again, Vault reachable
    try:
        later = third.grants.clock() + dt.timedelta(minutes=5)  # past the retry backoff
        third.grants.revocations.clock = lambda: later
        third.maintain()
        assert not token_alive(vault, token)
        shown = third.grants.get(str(issued["grant_id"]))
        assert shown.backend_revocation == "confirmed"
    finally:
        third.close()
    events = [json.loads(b) for b in _bodies(data)]
    kinds = [e["type"] for e in events if e.get("grant_id") == issued["grant_id"]]
    assert kinds[-3:] == [
        "grant.revoked",
        "grant.backend_revocation_failed",
        "grant.backend_revocation_confirmed",
    ]


def test_a_bulk_revocation_whose_credentials_the_reconciler_removed_ends_confirmed(
    tmp_path: Path, vault: VaultSetup, database: Postgres
) -> None:
    data = tmp_path / "data"
    first = make_broker(data, vault)
    with TestClient(create_app(broker=first)) as client:
        token_grant = approved_fine_tune(client, first)
        assert first.dev_issuer is not None
        workload = first.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
        login = client.post("/v1/token", data=exchange_form(workload, requested_token_type=VAULT))
        assert login.status_code == 200, login.text
    db_grant = login.json()
    ids = {str(token_grant["grant_id"]), str(db_grant["grant_id"])}

    dead = f"http://127.0.0.1:{free_port_pair()}"
    second = make_broker(data, vault, addr=dead)  # Vault unreachable during the bulk revocation
    with TestClient(create_app(broker=second)) as client:
        resp = client.post(
            "/v1/revocations", json={"model": "llama-7b", "reason": "leak"}, headers=admin(second)
        )
        assert resp.status_code == 200 and set(resp.json()["revoked"]) == ids
        assert {second.grants.get(g).backend_revocation for g in ids} == {"pending"}

    third = make_broker(data, vault)  # Vault back; the jobs wait for their retry
    try:
        removed = third.grants.revocations.reconcile(min_age_s=0)
        assert ids <= {item["grant_id"] for item in removed}  # the token and the carrier token
        # No retry was due and no maintenance ran: the reconciler settled the jobs it emptied.
        assert {third.grants.get(g).backend_revocation for g in ids} == {"confirmed"}
        with third.store.read() as s:
            jobs = s.scalars(select(RevocationRow).where(RevocationRow.grant_id.in_(ids))).all()
        assert {(j.status, j.attempts) for j in jobs} == {("confirmed", 2)}
    finally:
        third.close()
    assert not token_alive(vault, str(token_grant["access_token"]))
    assert not database.login_works(db_grant["username"], db_grant["access_token"])
    kinds = [json.loads(b)["type"] for b in _bodies(data)]
    assert kinds.count("grant.backend_revocation_confirmed") == 2


def _bodies(data: Path) -> list[bytes]:
    import sqlite3

    with sqlite3.connect(data / "broker.db") as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT body FROM events ORDER BY idx")]


CRASH = """
import os, sys
from broker.backends.vault import VaultBackend
from broker.grants.service import ExchangeRequest
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings

real_issue = VaultBackend.issue
def issue_then_die(self, grant):
    real_issue(self, grant)
    os._exit(9)  # killed after Vault issued, before the grant is committed active
VaultBackend.issue = issue_then_die
env = os.environ
broker = build_broker(Settings(dev=True, data_dir=sys.argv[1], policy=EXAMPLE_POLICY,
                               vault_addr=env["T_VAULT_ADDR"], vault_token=env["T_VAULT_TOKEN"]))
token = broker.dev_issuer.mint(sub=sys.argv[2], claims={"job_workflow_ref": sys.argv[3]})
broker.grants.exchange(ExchangeRequest(subject_token=token, model="llama-7b", action="evaluate",
                                       token_type="urn:broker:token-type:vault-token"))
"""


def test_a_crash_between_vault_and_the_commit_leaves_no_orphan(
    tmp_path: Path, vault: VaultSetup, database: Postgres
) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "T_VAULT_ADDR": vault.server.url, "T_VAULT_TOKEN": vault.broker_token}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(data), EVAL_SUB, EVAL_WORKFLOW],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 9, done.stderr.decode()[-2000:]

    broker = make_broker(data, vault)
    try:
        with broker.store.read() as s:
            [row] = s.scalars(select(GrantRow)).all()
            grant_id, status = row.id, row.status
        assert status == "issuing"
        live = [gid for gid, _ in broker.grants.backends.get("vault").list_live()]  # type: ignore[attr-defined]
        assert grant_id in live  # Vault holds a credential nobody was given

        # (The shared test Vault also holds other tests' tokens: unknown grants here, so orphans.)
        orphans = broker.grants.revocations.reconcile(min_age_s=0)
        assert grant_id in [o["grant_id"] for o in orphans]
        assert grant_id not in [gid for gid, _ in broker.grants.backends.get("vault").list_live()]  # type: ignore[attr-defined]
        assert broker.grants.revocations.settle_stuck(older_than_s=0) == 1
        assert broker.grants.get(grant_id).status == "failed"
    finally:
        broker.close()


def test_expired_grants_are_revoked_at_vault_by_the_sweeper(
    served: tuple[TestClient, Broker], vault: VaultSetup
) -> None:
    client, broker = served
    issued = approved_fine_tune(client, broker)
    token = str(issued["access_token"])
    assert token_alive(vault, token)
    later = broker.grants.clock() + dt.timedelta(hours=5)  # past the grant's expiry
    broker.grants.clock = lambda: later
    broker.grants.revocations.clock = lambda: later
    assert broker.grants.expire_due() == 1
    broker.grants.revocations.process()
    assert not token_alive(vault, token)  # Vault's TTL is the first line; the sweeper the second
    assert broker.grants.get(str(issued["grant_id"])).backend_revocation == "confirmed"


def _grant_rows(broker: Broker) -> list[GrantRow]:
    with broker.store.read() as s:
        return list(s.scalars(select(GrantRow)))


def test_concurrent_vault_exchanges_commit_in_groups_and_stay_exact(
    served: tuple[TestClient, Broker], vault: VaultSetup, database: Postgres
) -> None:
    """Both writes of a Vault exchange (the ``issuing`` row with the spent jti, then ``active``
    with its event) go through group commits shared with other exchanges."""
    client, broker = served
    assert broker.dev_issuer is not None
    mint = lambda: broker.dev_issuer.mint(  # noqa: E731
        sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW}
    )
    replayed = mint()
    forms = [exchange_form(mint(), requested_token_type=VAULT) for _ in range(6)]
    forms += [exchange_form(replayed, requested_token_type=VAULT) for _ in range(3)]
    results = post_concurrently(client, forms)
    assert [status for status, _ in results[:6]] == [200] * 6, results
    assert sorted(status for status, _ in results[6:]) == [200, 400, 400]
    issued = [json.loads(body) for status, body in results if status == 200]
    assert all(database.login_works(b["username"], b["access_token"]) for b in issued)
    rows = {r.id: r for r in _grant_rows(broker)}
    assert {b["grant_id"] for b in issued} == set(rows)
    assert all(r.status == "active" and r.credential_ref for r in rows.values())
    with broker.store.read() as s:
        bodies = [json.loads(r.body) for r in s.scalars(select(EventRow).order_by(EventRow.idx))]
    assert [e["idx"] for e in bodies] == list(range(len(bodies)))
    allowed = [e for e in bodies if e["type"] == "exchange.allowed"]
    assert sorted(e["grant_id"] for e in allowed) == sorted(rows)
    assert [e["credential_ref"] for e in allowed] == [
        rows[e["grant_id"]].credential_ref for e in allowed
    ]
    assert sum(e["type"] == "exchange.denied" for e in bodies) == 2


def test_a_grant_settled_while_vault_issued_is_not_reactivated(
    served: tuple[TestClient, Broker],
    vault: VaultSetup,
    database: Postgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should maintenance settle an ``issuing`` grant as failed while its backend call is under
    way, the exchange must not make it active again: 503, no credential, and the login is
    revoked at Vault."""
    client, broker = served
    assert broker.dev_issuer is not None
    backend = broker.grants.backends.for_token_type(VAULT)
    issue = backend.issue
    logins: list[Credential] = []

    def issue_then_settle(grant: Grant) -> Credential:
        credential = issue(grant)
        logins.append(credential)
        assert broker.grants.revocations.settle_stuck(older_than_s=0) == 1
        return credential

    monkeypatch.setattr(backend, "issue", issue_then_settle)
    workload = broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
    resp = client.post("/v1/token", data=exchange_form(workload, requested_token_type=VAULT))
    assert resp.status_code == 503, resp.text
    assert "access_token" not in resp.text
    [row] = _grant_rows(broker)
    assert row.status == "failed"
    broker.grants.revocations.process([row.id])
    [login] = logins
    # NOTE: Vault revokes the carrier token's leases asynchronously; the login goes soon after.
    assert wait_until(
        lambda: not database.login_works(str(login.extra["username"]), login.access_token)
    )


def test_the_cli_prints_every_part_of_a_database_login(
    tmp_path: Path, vault: VaultSetup, database: Postgres, capsys: pytest.CaptureFixture[str]
) -> None:
    """`broker token exchange` prints username and password (not a lone password), in the
    text format and as `--format env`, and both log in."""
    port = free_port()
    settings = Settings(
        dev=True,
        data_dir=tmp_path / "data",
        policy=EXAMPLE_POLICY,
        port=port,
        vault_addr=vault.server.url,
        vault_token=vault.broker_token,
    )
    broker = build_broker(settings)
    assert broker.dev_issuer is not None
    token = tmp_path / "workload.jwt"
    with LiveServer(create_app(broker=broker), port) as server:
        common = ["token", "exchange", "--token", str(token), "--url", server.url]
        common += ["--model", "llama-7b", "--action", "evaluate", "--backend", "vault"]
        parts: list[dict[str, str]] = []
        for fmt, sep in (("text", "  "), ("env", "=")):
            token.write_text(
                broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
            )
            assert main([*common, "--format", fmt]) == 0
            out = capsys.readouterr().out
            parts.append(dict(line.split(sep, 1) for line in out.splitlines()))
    text, env = ({k: v.strip() for k, v in p.items()} for p in parts)
    assert text["issued_token_type"] == "urn:broker:token-type:database-credentials"
    assert text["grant_id"].startswith("g_") and text["expires_at"].endswith("Z")
    assert database.login_works(text["username"], text["password"])
    env = {k: shlex.split(v)[0] for k, v in env.items()}
    assert database.login_works(env["DB_USERNAME"], env["DB_PASSWORD"])
    assert env["BROKER_GRANT_ID"] != text["grant_id"]
