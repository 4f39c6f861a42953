"""FastAPI dependencies: the broker instance and authenticated callers."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, TypeVar

import jwt
from fastapi import Depends, Request

from broker.errors import Forbidden, IdentityRejected, Unauthenticated
from broker.identity.types import Person, WorkloadIdentity
from broker.identity.verifier import MAX_TOKEN_BYTES
from broker.policy.roles import ModelAccess, access_for
from broker.runtime import Broker

T = TypeVar("T")


def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        error = Unauthenticated(
            "missing bearer token: send 'Authorization: Bearer <your OIDC token>'"
        )
        error.reason = "no_bearer"
        raise error
    return token.strip()


def _rejected(exc: IdentityRejected) -> Unauthenticated:
    """The 401 for a bearer token the verifier rejected, keeping the rejection's class."""
    error = Unauthenticated(f"bearer token rejected: {exc.description}")
    # The verifier names the class of what it rejected; what it never saw is malformed.
    error.reason = "malformed" if exc.reason == exc.code else exc.reason
    return error


def _bearer(request: Request, verify: Callable[[str], T]) -> T:
    """``verify`` applied to the bearer token; a rejection becomes 401."""
    try:
        return verify(bearer_token(request))
    except IdentityRejected as exc:
        raise _rejected(exc) from None


def authenticate_person(request: Request, broker: BrokerDep) -> Person:
    """The person behind the bearer token (a ``kind: people`` issuer). 401 when it is bad."""
    return _bearer(request, broker.verifier.verify_person)


PersonDep = Annotated[Person, Depends(authenticate_person)]


def authenticate_workload(request: Request, broker: BrokerDep) -> WorkloadIdentity:
    """The workload behind the bearer token (its own identity token). 401 when it is bad."""
    return _bearer(request, broker.verifier.verify_workload)


WorkloadDep = Annotated[WorkloadIdentity, Depends(authenticate_workload)]


def authenticate_any(request: Request, broker: BrokerDep) -> Person | WorkloadIdentity:
    """A person or a workload from any configured issuer (introspection callers)."""
    token = bearer_token(request)
    try:
        if len(token) > MAX_TOKEN_BYTES:
            raise IdentityRejected(f"larger than {MAX_TOKEN_BYTES} bytes")
        # Routing only: the unverified iss picks which verification to run, never what passes.
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        issuer = broker.policy.policy.issuer_by_url(iss) if isinstance(iss, str) else None
        if issuer is not None and issuer.kind == "people":
            return broker.verifier.verify_person(token)
        return broker.verifier.verify_workload(token)
    except IdentityRejected as exc:
        raise _rejected(exc) from None
    except jwt.InvalidTokenError:
        raise _rejected(IdentityRejected("not a JWT")) from None


class Permission(StrEnum):
    """What a person may be allowed to do. The API's routes and the console's pages both ask
    this module: :data:`ROLES` says which roles grant a permission, and the policy's role
    groups (broker.policy.roles) say for which models (:func:`model_access`). Whether one
    approver may review one request is then decided by the approval rules
    (``ApprovalService.refusal``)."""

    READ_GRANTS = "read grants"
    REVOKE_GRANTS = "revoke grants"
    ROTATE_KEYS = "rotate signing keys"
    READ_AUDIT = "read the audit log"
    READ_APPROVALS = "read approval requests, lineage and rollback tests"
    REVIEW_APPROVALS = "approve or deny approval requests"


ROLES: dict[Permission, tuple[str, ...]] = {
    Permission.READ_GRANTS: ("auditor", "admin"),
    Permission.REVOKE_GRANTS: ("admin",),
    Permission.ROTATE_KEYS: ("admin",),
    Permission.READ_AUDIT: ("auditor", "admin"),
    Permission.READ_APPROVALS: ("approver", "auditor", "admin"),
    Permission.REVIEW_APPROVALS: ("approver",),
}
"""The roles that grant each permission (any one of them), for the models their groups cover."""


def permits(person: Person, permission: Permission) -> bool:
    """Whether ``person`` holds ``permission`` for at least one model (its scope:
    :func:`scope`)."""
    return person.has_role(*ROLES[permission])


def require(person: Person, permission: Permission) -> None:
    """Raise Forbidden (naming the roles that would pass) unless ``person`` holds it."""
    require_role(person, *ROLES[permission])


def require_role(person: Person, *roles: str) -> None:
    if not person.has_role(*roles):
        raise Forbidden(
            f"{person.subject} of issuer {person.issuer_name} needs role {' or '.join(roles)}; "
            f"has {sorted(person.roles) or 'none'}"
        )


def scope(broker: Broker, person: Person, permission: Permission) -> ModelAccess:
    """The models ``person`` holds ``permission`` for (none when they lack its roles):
    THE decision of delegated administration (broker.policy.roles) over :data:`ROLES`."""
    return access_for(broker.policy.policy, person, *ROLES[permission])


def model_access(broker: Broker, person: Person, permission: Permission) -> ModelAccess:
    """:func:`scope`, asked by every admin, approver and auditor route and console page;
    403 without any of the permission's roles."""
    require(person, permission)
    return scope(broker, person, permission)


def require_model(access: ModelAccess, person: Person, model: str) -> None:
    """403 unless ``access`` covers ``model``."""
    refusal = access.refuses(model)
    if refusal is not None:
        raise Forbidden(f"{person.subject} of issuer {person.issuer_name} {refusal}")


def listed_models(
    broker: Broker, person: Person, permission: Permission, model: str | None
) -> list[str] | None:
    """What a list route shows ``person``: the models their ``permission`` covers (None:
    every model); 403 without its roles, or when the ``model`` asked for is out of scope."""
    access = model_access(broker, person, permission)
    if model:
        require_model(access, person, model)
    return access.models_in(broker.policy.policy.models)


def require_unscoped(access: ModelAccess, person: Person, what: str) -> None:
    """403 unless ``access`` covers every model: ``what`` concerns all of them."""
    if not access.unscoped:
        raise Forbidden(
            f"{person.subject} of issuer {person.issuer_name} holds {access.describe()}; "
            f"{what} needs the role for every model"
        )
