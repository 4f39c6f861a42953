"""Real servers for the vault backend's tests: OpenBao (with a file audit device) and PostgreSQL.

The root token is used here, and only here, to set Vault up the way ``terraform/vault`` does
(from the same :func:`~broker.backends.vault.plan_vault`). The backend under test runs with the
narrow broker token that this setup makes, never with root. Every server a fixture starts is
stopped in its ``finally``, whether the tests passed, failed, or the start itself failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.backends.vault import (
    DatabaseAccess,
    StaticToken,
    VaultBackend,
    VaultPlan,
    plan_vault,
    vault_config,
)
from broker.grants.model import Grant
from broker.policy import LoadedPolicy, load_policy
from broker.settings import EXAMPLE_POLICY
from tests.backends.conformance import make_grant as shared_make_grant
from tests.servers import OpenBao, Postgres

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")

# The database access that goes with examples/policy.yaml (and terraform/vault/database.tf):
# evaluation runs on llama-7b get a login to the evaluation-results database.
EXAMPLE_CONFIG = vault_config(load_policy(EXAMPLE_POLICY, dev_mode=True).policy)
assert EXAMPLE_CONFIG.databases == {
    "llama-7b": DatabaseAccess("llama-7b-eval-results", frozenset({"evaluate"}))
}
DB_CONNECTION = "eval-results"  # terraform/vault/database.tf
CREATION_STATEMENTS = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    'GRANT CONNECT ON DATABASE postgres TO "{{name}}";',
]
BROKER_JWT_ISSUER = "https://cluster.broker.test"
BROKER_JWT_AUDIENCE = "vault"
BROKER_JWT_SUBJECT = "system:serviceaccount:broker:model-credential-broker"


def example_policy() -> LoadedPolicy:
    return load_policy(EXAMPLE_POLICY, dev_mode=True)


def make_grant(**overrides: object) -> Grant:
    """An active vault grant for llama-7b fine-tune, 15 minutes long, with a fresh id."""
    return shared_make_grant(**{"backend": "vault", **overrides})


@pytest.fixture(scope="session")
def openbao(openbao_server: OpenBao) -> OpenBao:
    return openbao_server


# --- Vault as the broker needs it ----------------------------------------------------------------


@dataclass
class VaultSetup:
    """OpenBao set up from the plan, and the broker's own (non-root) token."""

    server: OpenBao
    policy: LoadedPolicy
    plan: VaultPlan
    broker_token: str
    broker_jwt_key: ec.EllipticCurvePrivateKey

    def backend(self, token: str | None = None) -> VaultBackend:
        return VaultBackend(
            self.server.url,
            StaticToken(token or self.broker_token),
            self.policy,
            config=self.plan.config,
        )

    def broker_identity_token(self) -> str:
        """The broker's own workload identity token, for Vault's JWT auth."""
        now = int(time.time())
        claims = {
            "iss": BROKER_JWT_ISSUER,
            "sub": BROKER_JWT_SUBJECT,
            "aud": BROKER_JWT_AUDIENCE,
            "iat": now,
            "exp": now + 300,
        }
        return jwt.encode(claims, self.broker_jwt_key, algorithm="ES256")


def apply_plan(root: hvac.Client, plan: VaultPlan) -> None:
    """Create with hvac what terraform/vault declares: policies, the token role, the broker's
    policy. (The database and JWT auth pieces need their servers; see the fixtures.)"""
    for name, hcl in plan.policies.items():
        root.sys.create_or_update_policy(name, hcl)
    root.sys.create_or_update_policy(plan.broker_policy_name, plan.broker_policy)
    role = plan.token_role
    root.write_data(
        f"auth/token/roles/{role.name}",
        data={
            "allowed_policies": list(role.allowed_policies),
            "orphan": role.orphan,
            "renewable": role.renewable,
            "token_explicit_max_ttl": role.token_explicit_max_ttl,
            "token_type": role.token_type,
        },
    )


def broker_token(root: hvac.Client, plan: VaultPlan, ttl: int) -> str:
    """The broker's own token: only its policy, no default policy, short-lived, an orphan."""
    created = root.auth.token.create(
        policies=[plan.broker_policy_name],
        no_default_policy=True,
        no_parent=True,
        ttl=f"{ttl}s",
        display_name="model-credential-broker",
    )
    return str(created["auth"]["client_token"])


def enable_broker_jwt_login(
    root: hvac.Client, plan: VaultPlan, key: ec.EllipticCurvePrivateKey
) -> None:
    config = plan.config
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    root.sys.enable_auth_method("jwt", path=config.broker_jwt_mount)
    root.write_data(
        f"auth/{config.broker_jwt_mount}/config",
        data={"jwt_validation_pubkeys": [public.decode()], "bound_issuer": BROKER_JWT_ISSUER},
    )
    root.write_data(
        f"auth/{config.broker_jwt_mount}/role/{config.broker_jwt_role}",
        data={
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": [BROKER_JWT_AUDIENCE],
            "bound_subject": BROKER_JWT_SUBJECT,
            "token_policies": [plan.broker_policy_name],
            "token_no_default_policy": True,
            "token_ttl": config.broker_token_ttl,
            "token_max_ttl": config.broker_token_ttl,
        },
    )


@pytest.fixture(scope="session")
def vault(openbao: OpenBao) -> VaultSetup:
    policy = example_policy()
    plan = plan_vault(policy.policy, EXAMPLE_CONFIG)
    apply_plan(openbao.root, plan)
    key = ec.generate_private_key(ec.SECP256R1())
    enable_broker_jwt_login(openbao.root, plan, key)
    token = broker_token(openbao.root, plan, plan.config.broker_token_ttl)
    return VaultSetup(openbao, policy, plan, token, key)


@pytest.fixture(scope="session")
def database(vault: VaultSetup, postgres: Postgres) -> Postgres:
    """Vault's database secrets engine, pointed at the throwaway cluster (terraform/vault's
    database.tf, with the test cluster's address)."""
    root, config = vault.server.root, vault.plan.config
    root.sys.enable_secrets_engine("database", path=config.database_mount)
    root.write_data(
        f"{config.database_mount}/config/{DB_CONNECTION}",
        data={
            "plugin_name": "postgresql-database-plugin",
            "connection_url": (
                f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres.host}:{postgres.port}"
                "/postgres?sslmode=disable"
            ),
            "username": postgres.admin_user,
            "password": postgres.admin_password,
            "allowed_roles": [r.name for r in vault.plan.database_roles],
            "verify_connection": True,
        },
    )
    for role in vault.plan.database_roles:
        root.write_data(
            f"{config.database_mount}/roles/{role.name}",
            data={
                "db_name": DB_CONNECTION,
                "creation_statements": CREATION_STATEMENTS,
                "default_ttl": role.default_ttl,
                "max_ttl": role.max_ttl,
            },
        )
    return postgres


@pytest.fixture
def backend(vault: VaultSetup) -> Iterator[VaultBackend]:
    """The backend under test, with the broker's narrow token."""
    b = vault.backend()
    try:
        yield b
    finally:
        b.close()
