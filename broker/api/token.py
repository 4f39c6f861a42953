"""``POST /v1/token`` (RFC 8693 token exchange) and ``POST /v1/introspect`` (RFC 7662)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form
from fastapi.responses import JSONResponse

from broker.api.deps import BrokerDep, authenticate_any
from broker.backends.base import TOKEN_TYPE_JWT
from broker.errors import (
    BrokerError,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnsupportedGrantType,
)
from broker.grants.introspection import introspect
from broker.grants.service import ExchangeRequest

router = APIRouter()

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = {
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
OptForm = Annotated[str | None, Form()]
OptFormList = Annotated[list[str] | None, Form()]


def _one(
    name: str, values: list[str] | None, error: type[BrokerError] = InvalidRequest
) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise error(f"{name}: expected exactly one, got {len(values)}")
    return values[0]


def parse_exchange(
    grant_type: str | None,
    subject_token: str | None,
    subject_token_type: str | None,
    resource: list[str] | None,
    scope: str | None,
    requested_token_type: str | None,
    audience: list[str] | None,
    actor_token: str | None,
    requested_ttl: str | None,
    **optional: str | None,
) -> ExchangeRequest:
    """Validate the form fields of a token exchange. Raises a BrokerError naming the field."""
    if not grant_type:
        raise InvalidRequest("grant_type is required")
    if grant_type != GRANT_TYPE:
        raise UnsupportedGrantType(f"grant_type: expected {GRANT_TYPE}, got {grant_type[:100]!r}")
    if not subject_token:
        raise InvalidRequest("subject_token is required")
    if subject_token_type not in SUBJECT_TOKEN_TYPES:
        got = "nothing" if subject_token_type is None else repr(subject_token_type[:100])
        raise InvalidRequest(
            f"subject_token_type: expected one of {sorted(SUBJECT_TOKEN_TYPES)}, got {got}"
        )
    if actor_token:
        raise InvalidRequest("actor_token: delegation is not supported; send only subject_token")
    target = _one("resource", resource, InvalidTarget)
    if target is None or not target.startswith("model:") or len(target) == len("model:"):
        raise InvalidTarget("resource: expected exactly one 'model:<model-id>'")
    actions = (scope or "").split()
    if len(actions) != 1:
        raise InvalidScope(f"scope: expected exactly one action, got {len(actions)}")
    ttl: int | None = None
    if requested_ttl:
        if not requested_ttl.isdigit() or int(requested_ttl) <= 0:
            raise InvalidRequest("requested_ttl: expected a positive number of seconds")
        ttl = int(requested_ttl)
    return ExchangeRequest(
        subject_token=subject_token,
        model=target.removeprefix("model:"),
        action=actions[0],
        token_type=requested_token_type or TOKEN_TYPE_JWT,
        audience=_one("audience", audience, InvalidTarget),
        requested_ttl=ttl,
        **optional,
    )


@router.post("/v1/token", tags=["exchange"], summary="RFC 8693 token exchange")
def token_exchange(
    broker: BrokerDep,
    grant_type: OptForm = None,
    subject_token: OptForm = None,
    subject_token_type: OptForm = None,
    resource: OptFormList = None,
    scope: OptForm = None,
    requested_token_type: OptForm = None,
    audience: OptFormList = None,
    actor_token: OptForm = None,
    reason: OptForm = None,
    lineage: OptForm = None,
    approval_id: OptForm = None,
    requested_ttl: OptForm = None,
) -> JSONResponse:
    started = time.perf_counter()
    metrics = broker.metrics
    try:
        req = parse_exchange(
            grant_type,
            subject_token,
            subject_token_type,
            resource,
            scope,
            requested_token_type,
            audience,
            actor_token,
            requested_ttl,
            reason=reason,
            lineage=lineage,
            approval_id=approval_id,
        )
        result = broker.grants.exchange(req)
    except BrokerError as exc:
        metrics.exchanges.labels(exc.code).inc()
        metrics.latency.observe(time.perf_counter() - started)
        raise
    cred = result.credential
    body: dict[str, Any] = {
        "access_token": cred.access_token,
        "issued_token_type": cred.issued_token_type,
        "token_type": cred.token_type,
        "expires_in": int((cred.expires_at - result.grant.issued_at).total_seconds()),
        "scope": result.grant.action,
        "grant_id": result.grant.id,
        **cred.extra,
    }
    metrics.exchanges.labels("issued").inc()
    metrics.latency.observe(time.perf_counter() - started)
    return JSONResponse(body, headers=NO_STORE)


@router.post("/v1/introspect", tags=["exchange"], summary="RFC 7662 introspection of broker JWTs")
def introspect_token(
    broker: BrokerDep,
    _caller: Annotated[object, Depends(authenticate_any)],
    token: OptForm = None,
) -> JSONResponse:
    if not token:
        raise InvalidRequest("token is required")
    body = introspect(token, keys=broker.keys, issuer_url=broker.issuer_url, grants=broker.grants)
    return JSONResponse(body, headers=NO_STORE)
