"""FastAPI dependencies: the broker instance and authenticated callers."""

from __future__ import annotations

from collections.abc import Callable
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


def require_role(person: Person, *roles: str) -> None:
    if not person.has_role(*roles):
        raise Forbidden(
            f"{person.subject} of issuer {person.issuer_name} needs role {' or '.join(roles)}; "
            f"has {sorted(person.roles) or 'none'}"
        )


def model_access(broker: Broker, person: Person, *roles: str) -> ModelAccess:
    """Which models ``person`` may act on with ``roles``: THE decision of delegated
    administration (broker.policy.roles), asked by every admin, approver and auditor route
    and meant for every other front end (the console). 403 without any of the roles."""
    require_role(person, *roles)
    return access_for(broker.policy.policy, person, *roles)


def require_model(access: ModelAccess, person: Person, model: str) -> None:
    """403 unless ``access`` covers ``model``."""
    refusal = access.refuses(model)
    if refusal is not None:
        raise Forbidden(f"{person.subject} of issuer {person.issuer_name} {refusal}")


def require_unscoped(access: ModelAccess, person: Person, what: str) -> None:
    """403 unless ``access`` covers every model: ``what`` concerns all of them."""
    if not access.unscoped:
        raise Forbidden(
            f"{person.subject} of issuer {person.issuer_name} holds {access.describe()}; "
            f"{what} needs the role for every model"
        )
