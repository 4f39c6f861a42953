"""Verified identities: the only shapes in which token claims travel past the verifier.

NOTE: both types refuse construction without the module-private seal, which only
:mod:`broker.identity.verifier` uses. Code downstream of verification (policy engine, grants,
admin auth) can therefore never be handed a raw dict of unverified claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

ClaimValue = str | int | float | bool | None | list[Any]
Profile = Literal["github", "gitlab", "kubernetes", "spiffe", "oidc"]

_SEAL = object()


def _check_seal(seal: object, kind: str) -> None:
    if seal is not _SEAL:
        raise TypeError(f"{kind} is constructed only by broker.identity.verifier")


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A verified workload identity token: issuer, subject and claims.

    ``claims`` holds every claim of the token, nested objects flattened with ``/``
    (``{"kubernetes.io": {"namespace": "x"}}`` becomes ``kubernetes.io/namespace``).
    ``attributes`` holds the claims the issuer's profile says identify the workload
    (GitHub ``repository``, Kubernetes service account ``uid``...): what a grant records.
    """

    issuer_name: str
    issuer: str
    subject: str
    profile: Profile
    claims: Mapping[str, ClaimValue]
    attributes: Mapping[str, str]
    audience: tuple[str, ...]
    issued_at: int
    expires_at: int
    jti: str | None
    single_use: bool
    _seal: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "WorkloadIdentity")


@dataclass(frozen=True, slots=True)
class Person:
    """A verified person (admin, approver, auditor) from a ``kind: people`` issuer."""

    issuer_name: str
    issuer: str
    subject: str
    roles: frozenset[str]
    groups: frozenset[str]
    """The raw values of the issuer's roles claim (per-model approver groups match these)."""
    expires_at: int
    _seal: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "Person")

    def has_role(self, *roles: str) -> bool:
        return any(r in self.roles for r in roles)


def _seal_workload(**kwargs: Any) -> WorkloadIdentity:
    kwargs["claims"] = MappingProxyType(dict(kwargs["claims"]))
    kwargs["attributes"] = MappingProxyType(dict(kwargs["attributes"]))
    return WorkloadIdentity(**kwargs, _seal=_SEAL)


def _seal_person(**kwargs: Any) -> Person:
    return Person(**kwargs, _seal=_SEAL)
