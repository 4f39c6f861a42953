"""The shared backend conformance suite (tests/backends/conformance.py), run against the vault
backend, for both kinds of credential it hands out: a token and a database login."""

from __future__ import annotations

import pytest

from broker.backends.base import TOKEN_TYPE_VAULT
from broker.backends.vault import TOKEN_TYPE_DATABASE, VaultBackend
from tests.backends.conformance import BackendConformance, NewGrant, Works
from tests.backends.vault.conftest import VaultSetup, make_grant

pytestmark = pytest.mark.integration

# kind → (action, issued token type): evaluate on llama-7b gets database logins (EXAMPLE_CONFIG).
KINDS = {"token": ("fine-tune", TOKEN_TYPE_VAULT), "database": ("evaluate", TOKEN_TYPE_DATABASE)}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "database":
        request.getfixturevalue("database")  # skips when PostgreSQL is not installed
    return str(request.param)


@pytest.fixture
def credential_works(kind: str, vault: VaultSetup, request: pytest.FixtureRequest) -> Works:
    """Whether a credential still opens what it was issued for, asked of the real server."""
    if kind == "database":
        database = request.getfixturevalue("database")
        return lambda cred: bool(database.login_works(cred.extra["username"], cred.access_token))

    return lambda cred: vault.server.token_works(cred.access_token)


class TestVaultConformance(BackendConformance):
    """Both kinds of vault credential: a token (fine-tune) and a database login (evaluate)."""

    @pytest.fixture
    def new_grant(self, kind: str) -> NewGrant:
        return lambda: make_grant(backend="vault", action=KINDS[kind][0])

    def test_issues_the_kind_the_model_configures(
        self, kind: str, backend: VaultBackend, new_grant: NewGrant
    ) -> None:
        assert backend.issue(new_grant()).issued_token_type == KINDS[kind][1]
