"""The shared backend conformance checks (tests/backends/test_conformance.py), run against the
vault backend, for both kinds of credential it hands out: a token and a database login."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hvac.exceptions import Forbidden

from broker.backends.base import TOKEN_TYPE_VAULT, Backend, BackendRegistry, Credential
from broker.backends.vault import TOKEN_TYPE_DATABASE, VaultBackend
from broker.errors import InvalidRequest
from broker.grants.model import Grant
from tests.backends.vault.conftest import VaultSetup, make_grant

pytestmark = pytest.mark.integration

# kind → (action, issued token type): evaluate on llama-7b gets database logins (EXAMPLE_CONFIG).
KINDS = {"token": ("fine-tune", TOKEN_TYPE_VAULT), "database": ("evaluate", TOKEN_TYPE_DATABASE)}
Works = Callable[[Credential], bool]


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

    def token_works(cred: Credential) -> bool:
        try:
            vault.server.client(cred.access_token).auth.token.lookup_self()
        except Forbidden:
            return False
        return True

    return token_works


def grant_for(kind: str, backend: Backend) -> Grant:
    return make_grant(backend=backend.name, action=KINDS[kind][0])


def test_issue_returns_a_credential_bound_to_the_grant(kind: str, backend: VaultBackend) -> None:
    grant = grant_for(kind, backend)
    cred = backend.issue(grant)
    assert cred.access_token
    assert cred.issued_token_type == KINDS[kind][1]
    assert cred.expires_at == grant.expires_at
    assert cred.credential_ref
    assert cred.access_token not in repr(cred)


def test_revoke_is_confirmed_and_the_credential_stops_working(
    kind: str, backend: VaultBackend, credential_works: Works
) -> None:
    grant = grant_for(kind, backend)
    cred = backend.issue(grant)
    assert credential_works(cred)
    assert backend.revoke(grant, cred.credential_ref) is True
    assert not credential_works(cred)


def test_registry_maps_token_types_and_refuses_disabled_ones(backend: VaultBackend) -> None:
    reg = BackendRegistry({backend.name: backend})
    assert reg.for_token_type(backend.token_type) is backend
    with pytest.raises(InvalidRequest, match="not supported"):
        reg.for_token_type("urn:nope")
    with pytest.raises(InvalidRequest, match="not enabled"):
        reg.get("jwt")
