"""The vault backend against a real OpenBao (and PostgreSQL), driven with the broker's own token."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hvac.exceptions import Forbidden, InvalidRequest

from broker.backends.vault import (
    BROKER_MARKER,
    TOKEN_TYPE_DATABASE,
    JwtLogin,
    StaticToken,
    VaultBackend,
    VaultConfig,
    VaultLogin,
    plan_vault,
)
from broker.errors import AccessDenied, BackendUnavailable, ConfigError
from broker.grants.model import Grant
from tests.backends.vault.conftest import EXAMPLE_CONFIG, VaultSetup, make_grant
from tests.servers import Postgres, free_port_pair, wait_until

pytestmark = pytest.mark.integration

CHECKPOINT = "secret/data/models/llama-7b/checkpoints/step-1"


def token_works(vault: VaultSetup, token: str) -> bool:
    return vault.server.token_works(token)


# --- tokens --------------------------------------------------------------------------------------


def test_token_is_scoped_to_the_model_and_action(vault: VaultSetup, backend: VaultBackend) -> None:
    grant = make_grant(action="fine-tune")
    cred = backend.issue(grant)
    token = vault.server.client(cred.access_token)
    token.secrets.kv.v2.create_or_update_secret("models/llama-7b/checkpoints/step-1", {"w": "1"})
    assert token.secrets.kv.v2.read_secret_version(
        "models/llama-7b/checkpoints/step-1", raise_on_deleted_version=True
    )["data"]["data"] == {"w": "1"}
    with pytest.raises(Forbidden):  # fine-tune may write checkpoints, not weights
        token.secrets.kv.v2.create_or_update_secret("models/llama-7b/weights", {"w": "evil"})
    with pytest.raises(Forbidden):  # nor touch another model
        token.secrets.kv.v2.read_secret_version(
            "models/mistral-7b/weights", raise_on_deleted_version=True
        )


def test_token_properties_and_metadata(vault: VaultSetup, backend: VaultBackend) -> None:
    grant = make_grant(subject="x" * 300)
    cred = backend.issue(grant)
    info = vault.server.client(cred.access_token).auth.token.lookup_self()["data"]
    assert info["accessor"] == cred.credential_ref
    assert sorted(info["policies"]) == ["broker-llama-7b-fine-tune", "default"]
    assert info["orphan"] is True and info["renewable"] is False
    assert info["role"] == "broker-issuer"
    assert info["explicit_max_ttl"] == info["creation_ttl"]
    remaining = (grant.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
    assert remaining - 5 <= info["ttl"] <= remaining
    assert info["meta"] == {
        "broker": BROKER_MARKER,
        "grant_id": grant.id,
        "model": "llama-7b",
        "action": "fine-tune",
        "issuer": "cluster",
        "subject": "x" * 128,
        "credential": "token",
    }
    assert cred.expires_at == grant.expires_at
    assert cred.access_token not in repr(cred)


def test_vault_audit_log_attributes_the_token_to_its_grant(
    vault: VaultSetup, backend: VaultBackend
) -> None:
    grant = make_grant()
    cred = backend.issue(grant)
    vault.server.client(cred.access_token).secrets.kv.v2.create_or_update_secret(
        "models/llama-7b/checkpoints/audited", {"w": "1"}
    )
    uses = [
        e
        for e in vault.server.audit_entries()
        if e["type"] == "response"
        and e["request"]["path"] == "secret/data/models/llama-7b/checkpoints/audited"
    ]
    assert uses, "the write is not in Vault's audit log"
    auth = uses[-1]["auth"]
    assert auth["metadata"]["grant_id"] == grant.id
    assert auth["metadata"]["broker"] == BROKER_MARKER
    assert auth["accessor"] == cred.credential_ref
    assert cred.access_token not in vault.server.audit_log.read_text()


def test_the_environment_does_not_redirect_calls_to_vault(
    vault: VaultSetup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The broker's Vault token goes to VAULT_ADDR only: no proxy and no .netrc from the
    environment (a dead proxy here would fail every call)."""
    dead = f"http://127.0.0.1:{free_port_pair()}"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password not-the-broker\n")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    backend = vault.backend()
    try:
        grant = make_grant()
        cred = backend.issue(grant)
        assert token_works(vault, cred.access_token)
        assert backend.revoke(grant, cred.credential_ref) is True
    finally:
        backend.close()


def test_revoke_stops_the_token_and_is_idempotent(vault: VaultSetup, backend: VaultBackend) -> None:
    grant = make_grant()
    cred = backend.issue(grant)
    assert token_works(vault, cred.access_token)
    assert backend.revoke(grant, cred.credential_ref) is True
    assert not token_works(vault, cred.access_token)
    assert backend.revoke(grant, cred.credential_ref) is True  # already gone: confirmed


def test_revoke_without_a_ref_finds_the_grants_tokens(
    vault: VaultSetup, backend: VaultBackend
) -> None:
    grant = make_grant()
    cred = backend.issue(grant)
    assert backend.revoke(grant, None) is True
    assert not token_works(vault, cred.access_token)


def test_revoke_refuses_a_token_of_another_grant(vault: VaultSetup, backend: VaultBackend) -> None:
    mine, theirs = make_grant(), make_grant()
    cred = backend.issue(theirs)
    with pytest.raises(AccessDenied, match=f"belongs to grant {theirs.id}, not to grant {mine.id}"):
        backend.revoke(mine, cred.credential_ref)
    assert token_works(vault, cred.access_token)


def test_revoke_refuses_a_token_the_broker_did_not_issue(
    vault: VaultSetup, backend: VaultBackend
) -> None:
    # Vault cannot restrict revoke-accessor to the broker's tokens; the backend checks.
    other = vault.server.root.auth.token.create(policies=["default"], ttl="10m")["auth"]
    with pytest.raises(AccessDenied, match="the broker did not issue it"):
        backend.revoke(make_grant(), other["accessor"])
    assert token_works(vault, other["client_token"])


def test_token_expires_with_its_grant(vault: VaultSetup, backend: VaultBackend) -> None:
    now = dt.datetime.now(dt.UTC)
    cred = backend.issue(make_grant(issued_at=now, expires_at=now + dt.timedelta(seconds=2)))
    assert token_works(vault, cred.access_token)
    assert wait_until(lambda: not token_works(vault, cred.access_token), timeout=5)


def test_list_live_reports_broker_tokens_only(vault: VaultSetup, backend: VaultBackend) -> None:
    live_grant, revoked_grant = make_grant(), make_grant()
    live = backend.issue(live_grant)
    revoked = backend.issue(revoked_grant)
    backend.revoke(revoked_grant, revoked.credential_ref)
    foreign = vault.server.root.auth.token.create(policies=["default"], ttl="10m")["auth"]
    listed = backend.list_live()
    assert (live_grant.id, live.credential_ref) in listed
    assert all(gid != revoked_grant.id for gid, _ in listed)
    assert all(ref != foreign["accessor"] for _, ref in listed)
    # A reconciler skips young tokens: their grant may still be being written.
    assert (live_grant.id, live.credential_ref) not in backend.list_live(min_age_s=60)
    # What a reconciler does with a token whose grant is gone:
    assert backend.revoke_ref(live_grant.id, str(live.credential_ref)) is True
    assert not token_works(vault, live.access_token)


def test_expired_grant_is_not_issued(backend: VaultBackend) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with pytest.raises(AccessDenied, match="has expired"):
        backend.issue(make_grant(expires_at=past))


# --- the broker's own access ---------------------------------------------------------------------


def test_the_broker_token_is_narrow(vault: VaultSetup) -> None:
    broker = vault.server.client(vault.broker_token)
    with pytest.raises(Forbidden):  # no token outside the role
        broker.auth.token.create(policies=["broker-llama-7b-fine-tune"])
    with pytest.raises(InvalidRequest, match="allowed policies"):  # the role bounds policies
        broker.write_data(
            "auth/token/create/broker-issuer", data={"policies": [vault.plan.broker_policy_name]}
        )
    with pytest.raises(Forbidden):  # cannot change policies
        broker.sys.create_or_update_policy("broker-llama-7b-evaluate", 'path "*" {}')
    with pytest.raises(Forbidden):  # cannot read model data itself
        broker.secrets.kv.v2.read_secret_version(
            "models/llama-7b/weights", raise_on_deleted_version=True
        )


def test_root_token_is_refused(vault: VaultSetup) -> None:
    backend = vault.backend(token=vault.server.root.token)
    try:
        with pytest.raises(ConfigError, match="refuses to use a Vault root token"):
            backend.check()
        with pytest.raises(ConfigError, match="root token"):
            backend.issue(make_grant())
    finally:
        backend.close()


@dataclass
class RecordingLogin:
    """A JwtLogin that remembers the logins it made."""

    source: JwtLogin
    logins: list[VaultLogin] = field(default_factory=list)

    @property
    def where(self) -> str:
        return self.source.where

    def login(self, client: object) -> VaultLogin:
        self.logins.append(self.source.login(client))
        return self.logins[-1]


def test_jwt_login_for_the_broker(vault: VaultSetup) -> None:
    config = vault.plan.config
    source = RecordingLogin(
        JwtLogin(config.broker_jwt_role, vault.broker_identity_token, config.broker_jwt_mount)
    )
    backend = VaultBackend(vault.server.url, source, vault.policy, config=config)
    try:
        grant = make_grant()
        cred = backend.issue(grant)
        assert token_works(vault, cred.access_token)
        [first] = source.logins
        assert vault.server.client(first.token).auth.token.lookup_self()["data"]["policies"] == [
            vault.plan.broker_policy_name
        ]
        # The broker's token is revoked (or expired early): it logs in again, once, and goes on.
        vault.server.root.auth.token.revoke(first.token)
        assert backend.revoke(grant, cred.credential_ref) is True
        assert len(source.logins) == 2
        assert not token_works(vault, cred.access_token)
    finally:
        backend.close()


def test_a_permission_error_names_the_path(vault: VaultSetup) -> None:
    token = vault.server.root.auth.token.create(policies=["default"], no_parent=True, ttl="10m")[
        "auth"
    ]["client_token"]
    backend = vault.backend(token=token)
    try:
        with pytest.raises(BackendUnavailable) as refused:
            backend.issue(make_grant())
    finally:
        backend.close()
    message = str(refused.value)
    assert "auth/token/create/broker-issuer: permission denied" in message
    assert vault.server.url in message and token not in message
    assert refused.value.to_wire()["error"] == "temporarily_unavailable"


def test_unreachable_vault(vault: VaultSetup) -> None:
    addr = f"http://127.0.0.1:{free_port_pair()}"
    backend = VaultBackend(addr, StaticToken("s.x"), vault.policy, config=EXAMPLE_CONFIG, timeout=2)
    try:
        grant = make_grant()
        for call in (
            lambda: backend.issue(grant),
            lambda: backend.revoke(grant, "AbCdEfGhIjKlMnOpQrStUvWx"),
            backend.list_live,
            backend.check,
        ):
            with pytest.raises(BackendUnavailable, match=f"vault at {addr} is unreachable"):
                call()
    finally:
        backend.close()


def test_ready_when_vault_answers_its_health_check(backend: VaultBackend) -> None:
    assert backend.ready() is None


def test_ready_names_an_unreachable_vault(vault: VaultSetup) -> None:
    addr = f"http://127.0.0.1:{free_port_pair()}"  # nothing listens there
    backend = VaultBackend(addr, StaticToken("s.x"), vault.policy, config=EXAMPLE_CONFIG)
    try:
        problem = backend.ready()
        assert problem is not None and problem.startswith(f"vault at {addr} is unreachable")
    finally:
        backend.close()


def test_drift(vault: VaultSetup, backend: VaultBackend) -> None:
    assert backend.drift() == []
    narrower = VaultConfig(
        databases=EXAMPLE_CONFIG.databases,
        action_access={
            **EXAMPLE_CONFIG.action_access,
            "fine-tune": EXAMPLE_CONFIG.action_access["evaluate"],
        },
    )
    other = VaultBackend(
        vault.server.url, StaticToken(vault.broker_token), vault.policy, config=narrower
    )
    try:
        assert other.drift() == [
            "policy broker-llama-7b-fine-tune differs from the rendered policy"
        ]
    finally:
        other.close()
    assert plan_vault(vault.policy.policy, narrower).token_role == vault.plan.token_role


# --- database logins -----------------------------------------------------------------------------


def evaluate_grant(seconds: int = 900) -> Grant:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return make_grant(
        action="evaluate", tier="low", issued_at=now, expires_at=now + dt.timedelta(seconds=seconds)
    )


def test_database_login_works_until_revoked(
    vault: VaultSetup, database: Postgres, backend: VaultBackend
) -> None:
    grant = evaluate_grant()
    cred = backend.issue(grant)
    assert cred.issued_token_type == TOKEN_TYPE_DATABASE
    assert str(cred.credential_ref).startswith("database/creds/llama-7b-eval-results/")
    assert cred.expires_at == grant.expires_at
    user = cred.extra["username"]
    assert database.login_works(user, cred.access_token)
    lease = vault.server.root.sys.read_lease(cred.credential_ref)["data"]
    remaining = (grant.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
    # The lease is the grant's, not the role's 1h. OpenBao gives its TTL in whole seconds,
    # rounded, so it may be up to a second past the float measured after it.
    assert remaining - 5 <= lease["ttl"] <= remaining + 1
    # ...and so is the password's expiry in PostgreSQL (the plugin moved it with the lease).
    assert abs((database.valid_until(user) - grant.expires_at).total_seconds()) <= 5
    assert backend.revoke(grant, cred.credential_ref) is True
    assert not database.login_works(user, cred.access_token)
    assert backend.revoke(grant, cred.credential_ref) is True


def test_database_login_is_held_by_a_spent_carrier_token(
    vault: VaultSetup, database: Postgres, backend: VaultBackend
) -> None:
    grant = evaluate_grant()
    cred = backend.issue(grant)
    carriers = [ref for gid, ref in backend.list_live() if gid == grant.id]
    assert len(carriers) == 1
    info = vault.server.root.write_data(
        "auth/token/lookup-accessor", data={"accessor": carriers[0]}
    )["data"]
    # One use left: Vault refuses to return a lease on a token's last use, so it can mint no more.
    assert info["num_uses"] == 1
    assert info["policies"] == ["broker-llama-7b-evaluate"]  # no default policy
    assert info["meta"]["credential"] == "database"
    # A reconciler revoking the carrier ends the login too (Vault revokes the token's leases).
    assert backend.revoke_ref(grant.id, carriers[0]) is True
    user = cred.extra["username"]
    assert wait_until(lambda: not database.login_works(user, cred.access_token))


def test_database_login_ends_with_its_grant(database: Postgres, backend: VaultBackend) -> None:
    cred = backend.issue(evaluate_grant(seconds=2))
    user = cred.extra["username"]
    assert database.login_works(user, cred.access_token)
    time.sleep(2)
    assert wait_until(lambda: not database.login_works(user, cred.access_token), timeout=10)


def test_the_broker_cannot_read_database_logins_itself(
    vault: VaultSetup, database: Postgres
) -> None:
    # Only a carrier token made for one grant can; see VaultBackend._issue_database.
    with pytest.raises(Forbidden):
        vault.server.client(vault.broker_token).read("database/creds/llama-7b-eval-results")
