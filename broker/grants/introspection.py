"""RFC 7662 introspection of broker JWTs: is this token's grant active right now?"""

from __future__ import annotations

from typing import Any

import jwt

from broker.audit.state import grant_ended_in_log, snapshot
from broker.backends.keys import ALGORITHM, KeyRing
from broker.grants.service import GrantService
from broker.identity.verifier import MAX_TOKEN_BYTES

INACTIVE: dict[str, Any] = {"active": False}


def _ended_in_log(grants: GrantService, grant_id: str) -> bool:
    """Whether the log ended a grant its row says is active. NOTE: the row is not evidence
    (a database writer can turn ``revoked`` back to ``active``); the log is. One indexed
    query; a disagreement fails the audit state check at once (``/readyz``, exchanges)."""
    with grants.store.read() as session:
        ended = grant_ended_in_log(snapshot(session), grant_id)
    if ended is None:
        return False
    index, kind = ended
    grants.audit.integrity.suspect(
        grant_id, f"the grants table says active but the log has {kind} at index {index}"
    )
    return True


def introspect(
    token: str, *, keys: KeyRing, issuer_url: str, grants: GrantService
) -> dict[str, Any]:
    """Introspection response for ``token``. Anything not a live broker JWT is just inactive
    (RFC 7662 §2.2: no reason is given, so the endpoint leaks nothing about other tokens), and
    so is every token while an audit integrity check fails (``/readyz`` says which)."""
    if len(token) > MAX_TOKEN_BYTES or grants.audit.integrity.problems():
        # NOTE: fail closed: while the store is proven to disagree with its log, its grants
        # table cannot vouch that anything is active.
        return INACTIVE
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = keys.public_key(kid) if isinstance(kid, str) else None
        if key is None:
            return INACTIVE
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=issuer_url,
            # The audience is the relying party's business; we answer for any of ours.
            options={"verify_aud": False, "require": ["exp", "iat", "jti", "sub", "iss"]},
        )
    except jwt.InvalidTokenError:
        return INACTIVE
    grant = grants.is_active(str(claims["jti"]))
    if grant is None or grant.model != claims.get("model") or grant.action != claims.get("action"):
        return INACTIVE
    if _ended_in_log(grants, grant.id):
        return INACTIVE
    return {
        "active": True,
        "scope": grant.action,
        "token_type": "Bearer",
        "sub": claims["sub"],
        "aud": claims.get("aud"),
        "iss": claims["iss"],
        "exp": claims["exp"],
        "iat": claims["iat"],
        "nbf": claims.get("nbf"),
        "jti": claims["jti"],
        "grant_id": grant.id,
        "model": grant.model,
        "action": grant.action,
        "tier": grant.tier,
    }
