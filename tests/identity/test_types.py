"""Verified identities can only be made by the verifier."""

from __future__ import annotations

from typing import Any

import pytest

from broker.identity import Person, WorkloadIdentity

WORKLOAD: dict[str, Any] = {
    "issuer_name": "ci",
    "issuer": "https://ci.example.com",
    "subject": "forged",
    "profile": "oidc",
    "claims": {},
    "attributes": {},
    "audience": ("model-broker",),
    "issued_at": 0,
    "expires_at": 1,
    "jti": None,
    "single_use": False,
}


def test_workload_identity_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError, match=r"constructed only by broker.identity.verifier"):
        WorkloadIdentity(**WORKLOAD)


def test_workload_identity_rejects_a_forged_seal() -> None:
    with pytest.raises(TypeError):
        WorkloadIdentity(**WORKLOAD, _seal=object())


def test_person_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError, match=r"constructed only by broker.identity.verifier"):
        Person(
            issuer_name="sso",
            issuer="https://sso.example.com",
            subject="x",
            roles=frozenset({"admin"}),
            groups=frozenset({"ml-platform-admins"}),
            expires_at=1,
        )
