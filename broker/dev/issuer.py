"""``DevIssuer``: mints workload and person tokens that the example policy trusts in dev mode.

NOTE: this is a dangerous convenience by design (anyone who can reach it becomes any workload or
any admin). The broker mounts it only with ``--dev``, which refuses non-loopback binds, and the
policy loader refuses ``dev: true`` issuers without ``--dev``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

from broker.backends.keys import ALGORITHM, SigningKey, new_private
from broker.errors import InvalidRequest
from broker.keys.store import ACTIVE, DEV_ISSUER, KeyStore
from broker.policy import LoadedPolicy

MAX_DEV_TTL = 24 * 3600


def dev_issuer_key(keys: KeyStore, *, create: bool = True) -> SigningKey | None:
    """The dev issuer's key, sealed in the store like every other (created when missing, if
    ``create``; else None when missing). Raises ConfigError."""
    if not create:
        found = keys.find(DEV_ISSUER)
        return SigningKey.from_stored(found[0], DEV_ISSUER) if found else None
    (stored,), _ = keys.ensure(DEV_ISSUER, lambda: [SigningKey.of(new_private()).stored(ACTIVE)])
    return SigningKey.from_stored(stored, DEV_ISSUER)


class DevIssuer:
    def __init__(self, key: SigningKey, policy: LoadedPolicy) -> None:
        self._key = key.private
        self._jwk = key.jwk
        self._policy = policy
        dev = [i for i in policy.policy.issuers if i.dev]
        self.workload = next((i for i in dev if i.kind == "workload"), None)
        self.people = next((i for i in dev if i.kind == "people"), None)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._jwk]}

    def static_key_sets(self) -> dict[str, dict[str, Any]]:
        """Issuer name → JWKS, for every ``dev: true`` issuer of the policy."""
        return {i.name: self.jwks() for i in self._policy.policy.issuers if i.dev}

    def mint(
        self,
        *,
        sub: str,
        claims: dict[str, Any] | None = None,
        aud: str | None = None,
        ttl: int = 600,
        roles: list[str] | None = None,
    ) -> str:
        """A workload token, or a person token when ``roles`` is given (mapped to the policy's
        group values for those roles, through the people issuer's roles claim)."""
        issuer = self.people if roles is not None else self.workload
        if issuer is None:
            kind = "people" if roles is not None else "workload"
            raise InvalidRequest(f"the policy has no dev issuer of kind {kind}")
        if not 0 < ttl <= MAX_DEV_TTL:
            raise InvalidRequest(f"ttl: expected 1..{MAX_DEV_TTL} seconds, got {ttl}")
        now = int(time.time())
        body: dict[str, Any] = dict(claims or {})
        body.update(
            iss=issuer.issuer,
            sub=sub,
            aud=aud or issuer.audiences[0],
            iat=now,
            exp=now + ttl,
            jti=secrets.token_hex(12),
        )
        if roles is not None:
            body[str(issuer.roles_claim)] = self._groups(roles)
        return jwt.encode(
            body, self._key, algorithm=ALGORITHM, headers={"kid": self._jwk["kid"], "typ": "JWT"}
        )

    def _groups(self, roles: list[str]) -> list[str]:
        mapping = self._policy.policy.roles
        # A role name becomes the first group the policy maps to it; anything else passes as is.
        groups = {
            role: plain[0]
            for role, values in mapping.items()
            if (plain := [v for v in values if isinstance(v, str)])
        }
        return [groups.get(r, r) for r in roles]  # type: ignore[call-overload]
