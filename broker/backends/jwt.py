"""The ``jwt`` backend: broker-signed JWTs scoped to one model and one action.

A broker JWT cannot be recalled from a relying party, so revocation is the grant's status,
which ``POST /v1/introspect`` reports; relying parties that need prompt revocation introspect,
the rest rely on the short TTL.
"""

from __future__ import annotations

from broker.backends.base import TOKEN_TYPE_JWT, Credential
from broker.backends.keys import KeyRing
from broker.grants.model import Grant


def default_audience(model: str) -> str:
    """The audience of a broker JWT when the caller asks for none: the RFC 8707 resource."""
    return f"model:{model}"


class JwtBackend:
    name = "jwt"
    token_type = TOKEN_TYPE_JWT
    external = False  # signing is local; nothing exists until the response is sent

    def __init__(self, keys: KeyRing, issuer_url: str) -> None:
        self._keys = keys
        self._issuer = issuer_url

    def refresh_due(self) -> bool:
        """Whether the next :meth:`issue` reads the store for the keys (see Refreshing)."""
        return self._keys.due()

    def issue(self, grant: Grant) -> Credential:
        key = self._keys.current
        iat = int(grant.issued_at.timestamp())
        claims = {
            "iss": self._issuer,
            "sub": grant.subject,
            "aud": grant.audience or default_audience(grant.model),
            "iat": iat,
            "nbf": iat,
            "exp": int(grant.expires_at.timestamp()),
            "jti": grant.id,
            "model": grant.model,
            "action": grant.action,
            "tier": grant.tier,
        }
        return Credential(
            access_token=key.sign_jwt(claims),
            issued_token_type=TOKEN_TYPE_JWT,
            token_type="Bearer",  # noqa: S106 (a scheme name)
            expires_at=grant.expires_at,
            credential_ref=grant.id,
        )

    def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
        # Nothing to call: the grant's status (read by introspection) is the revocation.
        return True
