"""Real servers for the vault backend's tests: OpenBao (with a file audit device) and PostgreSQL.

The root token is used here, and only here, to set Vault up the way ``terraform/vault`` does
(from the same :func:`~broker.backends.vault.plan_vault`). The backend under test runs with the
narrow broker token that this setup makes, never with root. Every server a fixture starts is
stopped in its ``finally``, whether the tests passed, failed, or the start itself failed.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
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
from tests.servers import OpenBao, free_port_pair

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


# --- PostgreSQL ----------------------------------------------------------------------------------


@dataclass
class Postgres:
    host: str
    port: int
    admin_user: str
    admin_password: str

    def login_works(self, user: str, password: str) -> bool:
        """Whether ``user`` can log in with ``password`` over TCP (password authentication)."""
        result = self._psql(user, password, "select current_user")
        return result.returncode == 0 and result.stdout.strip() == user

    def valid_until(self, user: str) -> dt.datetime:
        """The user's password expiry (``VALID UNTIL``), asked as the admin."""
        query = f"select extract(epoch from rolvaliduntil) from pg_roles where rolname = '{user}'"
        result = self._psql(self.admin_user, self.admin_password, query)
        return dt.datetime.fromtimestamp(float(result.stdout), dt.UTC)

    def _psql(self, user: str, password: str, query: str) -> subprocess.CompletedProcess[str]:
        command = [str(PG_BIN / "psql"), "-h", self.host, "-p", str(self.port)]
        return subprocess.run(
            [*command, "-U", user, "-d", "postgres", "-w", "-tAc", query],
            env={"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5", "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=False,
        )


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the postgres OS user when we are root (initdb refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL 15 cluster on a free loopback port; password auth over TCP."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL binaries are not installed in {PG_BIN}")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres OS user to run initdb as")
    # Not under pytest's tmp dir: that is private to root, and the cluster runs as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="broker-vault-pg-"))
    data = workdir / "data"
    pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data)]
    password = secrets.token_urlsafe(18)
    port = free_port_pair()
    started = False
    try:
        pwfile = workdir / "pw"
        pwfile.write_text(password)
        if os.geteuid() == 0:
            for path in (workdir, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    f"--pgdata={data}",
                    "--username=postgres",
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = True
        subprocess.run(
            _as_postgres([*pg_ctl, "-l", str(workdir / "log"), "-w", "-o", options, "start"]),
            check=True,
            capture_output=True,
        )
        yield Postgres("127.0.0.1", port, "postgres", password)
    finally:
        if started:
            subprocess.run(
                _as_postgres([*pg_ctl, "-m", "immediate", "stop"]),
                check=False,
                capture_output=True,
            )
        shutil.rmtree(workdir, ignore_errors=True)


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
    # The broker's own token: only its policy, no default policy, short-lived, an orphan.
    created = openbao.root.auth.token.create(
        policies=[plan.broker_policy_name],
        no_default_policy=True,
        no_parent=True,
        ttl=f"{plan.config.broker_token_ttl}s",
        display_name="model-credential-broker",
    )
    return VaultSetup(openbao, policy, plan, created["auth"]["client_token"], key)


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
