"""The shared backend conformance suite. Every backend's tests subclass
:class:`BackendConformance` and provide three fixtures:

- ``backend``: the backend under test, talking to its real system;
- ``new_grant``: a callable returning a fresh active grant this backend can serve;
- ``credential_works``: a callable asking the real system whether a credential still opens what
  it was issued for.

and may override ``revoke`` (revoke a credential the way the broker does for this backend;
True once the backend confirmed). The revocation checks observe the effect through
``credential_works``, never only the return value.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable

import pytest

from broker.backends.base import BACKEND_FOR_TOKEN_TYPE, Backend, BackendRegistry, Credential
from broker.errors import InvalidRequest
from broker.grants.model import Grant, GrantStatus

NewGrant = Callable[[], Grant]
Works = Callable[[Credential], bool]
Revoke = Callable[[Grant, Credential], bool]


def make_grant(**overrides: object) -> Grant:
    """An active grant for llama-7b fine-tune, 15 minutes long, with a fresh id."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    fields: dict[str, object] = dict(
        id=f"g_{secrets.token_hex(8)}",
        issuer="cluster",
        issuer_url="https://kubernetes.default.svc",
        subject="system:serviceaccount:training:trainer",
        identity_claims={},
        model="llama-7b",
        action="fine-tune",
        tier="elevated",
        backend="jwt",
        rule="trainer",
        policy_digest="sha256:00",
        audience=None,
        reason=None,
        lineage=None,
        approval_id=None,
        issued_at=now,
        expires_at=now + dt.timedelta(minutes=15),
        status=GrantStatus.ACTIVE,
    )
    fields.update(overrides)
    return Grant(**fields)  # type: ignore[arg-type]


class BackendConformance:
    @pytest.fixture
    def revoke(self, backend: Backend) -> Revoke:
        """The backend's own revocation: what the broker's revocation queue calls."""
        return lambda grant, cred: backend.revoke(grant, cred.credential_ref)

    def test_declares_its_name_token_type_and_kind(self, backend: Backend) -> None:
        assert BACKEND_FOR_TOKEN_TYPE[backend.token_type] == backend.name
        assert isinstance(backend.external, bool)

    def test_issue_returns_a_credential_bound_to_the_grant(
        self, backend: Backend, new_grant: NewGrant, credential_works: Works
    ) -> None:
        grant = new_grant()
        cred = backend.issue(grant)
        assert cred.access_token
        assert cred.expires_at == grant.expires_at
        assert cred.credential_ref
        assert cred.access_token not in repr(cred)
        assert credential_works(cred)

    def test_each_grant_gets_its_own_credential(
        self, backend: Backend, new_grant: NewGrant
    ) -> None:
        first, second = backend.issue(new_grant()), backend.issue(new_grant())
        assert first.access_token != second.access_token
        assert first.credential_ref != second.credential_ref

    def test_revoke_is_confirmed_idempotent_and_reaches_the_backend(
        self, backend: Backend, new_grant: NewGrant, credential_works: Works, revoke: Revoke
    ) -> None:
        grant = new_grant()
        cred = backend.issue(grant)
        assert credential_works(cred)
        assert revoke(grant, cred) is True
        assert not credential_works(cred)
        # A retried revocation (the queue retries until confirmed) is confirmed again and
        # brings nothing back.
        assert backend.revoke(grant, cred.credential_ref) is True
        assert not credential_works(cred)

    def test_revoking_one_grant_leaves_others_working(
        self, backend: Backend, new_grant: NewGrant, credential_works: Works, revoke: Revoke
    ) -> None:
        keep, drop = new_grant(), new_grant()
        kept, dropped = backend.issue(keep), backend.issue(drop)
        assert revoke(drop, dropped) is True
        assert not credential_works(dropped)
        assert credential_works(kept)

    def test_registry_maps_token_types_and_refuses_disabled_ones(self, backend: Backend) -> None:
        reg = BackendRegistry({backend.name: backend})
        assert reg.for_token_type(backend.token_type) is backend
        with pytest.raises(InvalidRequest, match="not supported"):
            reg.for_token_type("urn:nope")
        other = ({"jwt", "vault", "aws"} - {backend.name}).pop()
        with pytest.raises(InvalidRequest, match="not enabled"):
            reg.get(other)
