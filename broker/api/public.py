"""Discovery, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.api.deps import BrokerDep
from broker.backends.keys import ALGORITHM
from broker.errors import TemporarilyUnavailable

router = APIRouter()


@router.get("/.well-known/openid-configuration", tags=["discovery"])
def openid_configuration(broker: BrokerDep) -> dict[str, Any]:
    base = broker.issuer_url
    return {
        "issuer": base,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "token_endpoint": f"{base}/v1/token",
        "introspection_endpoint": f"{base}/v1/introspect",
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALGORITHM],
        "token_endpoint_auth_methods_supported": ["none"],
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "iat",
            "nbf",
            "exp",
            "jti",
            "model",
            "action",
            "tier",
        ],
    }


@router.get("/.well-known/jwks.json", tags=["discovery"])
def jwks(broker: BrokerDep) -> Response:
    # The same bytes on every replica (see KeyRing.jwks_json).
    return Response(
        broker.keys.jwks_json(),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readyz(broker: BrokerDep) -> dict[str, Any]:
    """200 when every part an exchange needs works; 503 naming the parts that do not.
    ``notices`` (when there are any) name what is wrong without stopping exchanges, such as
    checkpoint publication that is behind."""
    checks = broker.readiness()
    notices = broker.notices()
    extra: dict[str, Any] = {"notices": notices} if notices else {}
    failing = {part: problem for part, problem in checks.items() if problem != "ok"}
    if failing:
        named = "; ".join(f"{part}: {problem}" for part, problem in failing.items())
        raise TemporarilyUnavailable(
            f"not ready: {named}", status="unavailable", checks=checks, **extra
        )
    return {"status": "ready", "policy_digest": broker.policy.digest, "checks": checks, **extra}


@router.get("/metrics", tags=["health"])
def metrics(broker: BrokerDep) -> Response:
    return Response(generate_latest(broker.metrics.registry), media_type=CONTENT_TYPE_LATEST)
