"""Discovery, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

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
def jwks(broker: BrokerDep) -> JSONResponse:
    return JSONResponse(broker.keys.jwks(), headers={"Cache-Control": "public, max-age=300"})


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readyz(broker: BrokerDep) -> dict[str, str]:
    with broker.store.read() as session:
        session.execute(text("SELECT 1"))
    if broker.keys.current is None:
        raise TemporarilyUnavailable("no signing key")
    return {"status": "ready", "policy_digest": broker.policy.digest}


@router.get("/metrics", tags=["health"])
def metrics(broker: BrokerDep) -> Response:
    return Response(generate_latest(broker.metrics.registry), media_type=CONTENT_TYPE_LATEST)
