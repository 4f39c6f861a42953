"""One error hierarchy for the whole broker.

Every error the broker raises on purpose derives from :class:`BrokerError`. Each class carries a
stable wire ``code`` (the RFC 6749 §5.2 ``error`` value or the admin API's) and an HTTP ``status``;
the API layer maps them without knowing the individual cases. Descriptions name what failed
(claim, expected vs actual) and never contain a token or a secret.
"""

from __future__ import annotations

from typing import Any, ClassVar

MAX_DESCRIPTION_CHARS = 4096
"""A net under the caps where caller input is quoted (broker.bounds): no description is longer."""


def _net(text: str) -> str:
    if len(text) <= MAX_DESCRIPTION_CHARS:
        return text
    return text[:MAX_DESCRIPTION_CHARS] + f"…[{len(text)} characters]"


class BrokerError(Exception):
    """Base of every deliberate broker error.

    ``description`` is what any caller may read. ``detail`` (default: the description) is the
    full explanation, which may name what the policy expects; it goes to the audit log, to
    admins, and to callers only where the broker discloses it (``to_wire(disclose=True)``, in
    dev mode or with the policy's ``explain_denials``), together with ``disclosed`` fields.
    ``attributed`` says the caller's identity token verified: the refusal is one an audit event
    records one by one, never one that an unverified caller's rate limit counts."""

    code: ClassVar[str] = "server_error"
    status: ClassVar[int] = 500

    def __init__(
        self,
        description: str,
        *,
        detail: str | None = None,
        disclosed: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        description = _net(description)
        super().__init__(description)
        self.description = description
        self.detail = description if detail is None else _net(detail)
        self.disclosed = disclosed or {}
        self.fields = fields
        self.attributed = False
        self.reason = self.code
        """The class of the refusal, for counting (the verifier refines it: ``malformed``,
        ``untrusted_issuer``, ``bad_signature``, ``bad_claims``, ``bad_time``)."""

    def to_wire(self, *, disclose: bool = False) -> dict[str, Any]:
        """The JSON body the API returns for this error; ``disclose`` adds the full detail."""
        text = self.detail if disclose else self.description
        body: dict[str, Any] = {"error": self.code, "error_description": text}
        body.update({k: v for k, v in self.fields.items() if v is not None})
        if disclose:
            body.update(self.disclosed)
        return body


# --- configuration -------------------------------------------------------------------------------


class ConfigError(BrokerError):
    """The broker's own configuration is unusable (settings, data dir, keys)."""


class PolicyError(ConfigError):
    """The policy file is invalid. ``str()`` names the file, the path in the document and what."""

    def __init__(self, file: str, path: str, message: str) -> None:
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.path = path
        self.message = message


# --- token exchange (RFC 6749 §5.2 / RFC 8693 §2.2.2) -------------------------------------------


class InvalidRequest(BrokerError):
    """The request is malformed or the subject token is bad or unacceptable."""

    code = "invalid_request"
    status = 400


class IdentityRejected(InvalidRequest):
    """The subject token failed verification (signature, issuer, claims, replay...)."""


class TokenReplayed(IdentityRejected):
    """A single-use subject token (its ``jti``) was presented again."""


class UnsupportedGrantType(BrokerError):
    code = "unsupported_grant_type"
    status = 400


class InvalidTarget(BrokerError):
    """Unknown model, or an audience the model does not allow."""

    code = "invalid_target"
    status = 400


class InvalidScope(BrokerError):
    """Unknown action, or not exactly one action."""

    code = "invalid_scope"
    status = 400


class AccessDenied(BrokerError):
    """No rule allows this identity to do this action on this model through this backend."""

    code = "access_denied"
    status = 403


class ApprovalRequired(BrokerError):
    """The action's tier needs approval by other people before a credential is issued."""

    code = "approval_required"
    status = 403


class TemporarilyUnavailable(BrokerError):
    """A dependency is down; nothing was issued."""

    code = "temporarily_unavailable"
    status = 503


class BackendUnavailable(TemporarilyUnavailable):
    """A credential backend (jwt signer, Vault, AWS) could not issue or revoke."""


class AuditUnavailable(TemporarilyUnavailable):
    """The store or audit log could not record the event, so nothing is issued."""


class ExchangeFailed(TemporarilyUnavailable):
    """An unexpected error (a bug) ended an exchange: it was refused and recorded, and nothing
    was issued (fail closed)."""


class RateLimited(BrokerError):
    """This client address has spent its budget of unverifiable attempts; ``retry_after`` is in
    seconds."""

    code = "rate_limited"
    status = 429

    def __init__(self, description: str, *, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after


# --- admin API -----------------------------------------------------------------------------------


class Unauthenticated(BrokerError):
    """Missing or bad bearer token on an admin route."""

    code = "invalid_token"
    status = 401


class Forbidden(BrokerError):
    """A valid person without the role the route needs."""

    code = "insufficient_role"
    status = 403


class NotFound(BrokerError):
    code = "not_found"
    status = 404


class Conflict(BrokerError):
    """The request conflicts with the current state (e.g. revoking a revoked grant)."""

    code = "conflict"
    status = 409
