"""``POST /dev/token``: mounted only in dev mode, which is loopback-only."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from broker.api.deps import BrokerDep
from broker.errors import NotFound

router = APIRouter(prefix="/dev", tags=["dev"])


class DevTokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sub: str = Field(min_length=1, max_length=500)
    claims: dict[str, object] = Field(default_factory=dict)
    aud: str | None = None
    ttl: int = 600
    roles: list[str] | None = None


@router.post("/token")
def dev_token(body: DevTokenBody, broker: BrokerDep) -> dict[str, str]:
    if broker.dev_issuer is None:  # defence in depth: the router is not mounted outside dev
        raise NotFound("not found")
    token = broker.dev_issuer.mint(
        sub=body.sub, claims=body.claims, aud=body.aud, ttl=body.ttl, roles=body.roles
    )
    return {"token": token}
