"""The policy file's schema (pydantic v2). Every field of ``docs/policy.md`` lives here.

Unknown fields are errors (``extra="forbid"``) so that a typo never silently loosens a rule.
Cross-references between sections (a rule's issuer, actions, models and backends; duplicate
names) are checked by :mod:`broker.policy.loader`, which can name the exact place in the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from broker.durations import parse_duration

Tier = Literal["low", "elevated", "privileged"]
IssuerKind = Literal["workload", "people"]
ProfileName = Literal["github", "gitlab", "kubernetes", "spiffe", "oidc"]
BackendName = Literal["jwt", "vault", "aws"]
RoleName = Literal["admin", "approver", "auditor"]

# NOTE: only asymmetric algorithms can ever be allow-listed; HS* with a public key as the
# secret is the classic algorithm-confusion attack (RFC 8725 §2.1).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
KNOWN_PROFILE_ISSUERS: dict[str, ProfileName] = {
    "https://token.actions.githubusercontent.com": "github",
    "https://gitlab.com": "gitlab",
}

Duration = Annotated[int, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConsoleClient(_Strict):
    """How the browser console (``/console``) signs people in with this people issuer: an
    OpenID Connect client registered at the issuer (authorization code flow with PKCE)."""

    client_id: str = Field(min_length=1)
    """The client registered at the issuer; ID tokens carry it as ``aud``, so it must also be
    one of the issuer's ``audiences``."""
    client_secret_file: Path | None = None
    """A confidential client's secret, relative to the policy file; none: a public client
    (PKCE only)."""
    redirect_url: str | None = Field(default=None, pattern=r"^https?://\S+/console/callback$")
    """Default: the broker's issuer URL (``BROKER_ISSUER_URL``) + ``/console/callback``."""
    scopes: list[str] = Field(default_factory=lambda: ["openid"], min_length=1)
    """Scopes asked for; ``openid`` is required, add what the issuer needs to put the roles
    claim in the ID token (``groups``, ``profile``...)."""

    @field_validator("scopes")
    @classmethod
    def _openid(cls, scopes: list[str]) -> list[str]:
        if "openid" not in scopes:
            raise ValueError("scopes must include openid (it is an OpenID Connect sign-in)")
        return scopes


class IssuerConfig(_Strict):
    """A trusted identity provider."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    issuer: str = Field(min_length=1)
    audiences: list[str] = Field(min_length=1)
    kind: IssuerKind = "workload"
    profile: ProfileName | None = None
    """Which claims identify a workload; default: guessed from the issuer URL, else ``oidc``."""
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    single_use: bool = False
    jwks_file: Path | None = None
    jwks_uri: str | None = None
    max_key_age: Duration = 86400
    """Stop accepting this issuer's tokens once its last good key set is older than this."""
    roles_claim: str | None = None
    dev: bool = False
    """Keys come from the broker's in-process dev issuer; refused unless ``--dev``."""
    console: ConsoleClient | None = None
    """People issuers only: sign-in to the browser console (docs/console.md)."""

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algs: list[str]) -> list[str]:
        bad = [a for a in algs if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
            raise ValueError(f"algorithms {bad} are not allowed; use asymmetric ones: {allowed}")
        return algs

    @model_validator(mode="after")
    def _key_source(self) -> IssuerConfig:
        sources = [s for s in (self.jwks_file, self.jwks_uri) if s is not None]
        if len(sources) > 1:
            raise ValueError("give at most one of jwks_file and jwks_uri")
        if self.dev and sources:
            raise ValueError("a dev issuer takes its keys from the broker; drop jwks_file/jwks_uri")
        if self.kind == "people" and not self.roles_claim:
            raise ValueError("a people issuer needs roles_claim (the claim that lists groups)")
        if self.kind == "workload" and self.roles_claim:
            raise ValueError("roles_claim is only for kind: people")
        if self.console is not None:
            if self.kind != "people":
                raise ValueError("console is only for kind: people (people sign in to it)")
            if self.console.client_id not in self.audiences:
                raise ValueError(
                    f"console.client_id {self.console.client_id!r} must be one of audiences: "
                    "the ID token's aud is the client id, and the verifier checks aud"
                )
        return self

    @property
    def effective_profile(self) -> ProfileName:
        if self.profile is not None:
            return self.profile
        if self.issuer in KNOWN_PROFILE_ISSUERS:
            return KNOWN_PROFILE_ISSUERS[self.issuer]
        if "kubernetes.default.svc" in self.issuer:
            return "kubernetes"
        return "oidc"


_RATE = re.compile(r"^\s*(\d+)\s+per\s+(\S+)\s*$")


def _parse_rate(value: object) -> object:
    """``"2 per 24h"`` → ``{"count": 2, "per": "24h"}``; a mapping is left to the model."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if not m:
            raise ValueError(
                f"expected '<count> per <duration>' such as '2 per 24h', got {value!r}"
            )
        return {"count": int(m.group(1)), "per": m.group(2)}
    return value


class EmergencyRate(_Strict):
    """At most ``count`` emergency uses by one identity within any ``per`` seconds."""

    count: int = Field(ge=1)
    per: Duration


class EmergencyConfig(_Strict):
    """Break-glass use of an action that needs approval: issued at once, reviewed after."""

    ttl_cap: Duration
    """The credential's lifetime is at most this (and at most the action's max_ttl)."""
    ratify_within: Duration
    """Approvers must approve the use (as the tier says) within this, or it is flagged."""
    max_per_identity: Annotated[EmergencyRate, BeforeValidator(_parse_rate)]


class ActionConfig(_Strict):
    tier: Tier
    max_ttl: Duration
    approvals: int = Field(default=0, ge=0)
    rollback_tested: Literal["required"] | None = None
    emergency: EmergencyConfig | None = None
    """Break-glass use (docs/approvals.md "Break-glass"); none unless set."""
    rollback: bool = False
    """The owners' rollback path: admins and approvers scoped to models cannot revoke its
    grants nor review its requests (docs/approvals.md "Delegated administration")."""

    @model_validator(mode="after")
    def _tier_consistency(self) -> ActionConfig:
        if self.tier == "low" and self.approvals:
            raise ValueError("a low-tier action needs no approvals; raise its tier instead")
        if self.tier != "low" and self.approvals < 1:
            raise ValueError(f"a {self.tier} action needs approvals: 1 or more")
        if self.rollback_tested and self.tier != "privileged":
            raise ValueError("rollback_tested applies to privileged actions only")
        if self.emergency is not None and self.tier == "low":
            raise ValueError("emergency applies to actions that need approval; this one is low")
        return self


class JwtBackendConfig(_Strict):
    audiences: list[str] = Field(default_factory=list)
    """Audiences a caller may request besides the default ``model:<id>``."""


class VaultBackendConfig(_Strict):
    policy_paths: list[str] = Field(min_length=1)
    database_role: str | None = None
    """A role of Vault's database secrets engine: ``database_actions`` get dynamic logins."""
    database_actions: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _database(self) -> VaultBackendConfig:
        if bool(self.database_role) != bool(self.database_actions):
            raise ValueError("give database_role and database_actions together")
        return self


class AwsBackendConfig(_Strict):
    role_arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
    s3_prefix: str = Field(pattern=r"^s3://[a-z0-9.-]+/.*$")


class ModelBackends(_Strict):
    jwt: JwtBackendConfig = Field(default_factory=JwtBackendConfig)
    vault: VaultBackendConfig | None = None
    aws: AwsBackendConfig | None = None


_BACKEND_NAMES = frozenset(ModelBackends.model_fields)


class ModelConfig(_Strict):
    owners: list[str] = Field(default_factory=list)
    backends: ModelBackends = Field(default_factory=ModelBackends)
    approvers: list[str] = Field(default_factory=list)
    """Groups (values of a people issuer's roles claim) whose approvers may review requests for
    this model; empty: any person with the ``approver`` role."""

    def has_backend(self, backend: str) -> bool:
        """Whether credentials for this model can come from ``backend`` (``jwt`` always can)."""
        # Look the name up among the declared backends only: getattr() with an arbitrary name
        # would find pydantic's own attributes (``model_config``...) and answer yes.
        if backend not in _BACKEND_NAMES:
            return False
        return backend == "jwt" or getattr(self.backends, backend) is not None

    def backend_names(self) -> list[str]:
        """The backends configured for this model, ``jwt`` first."""
        return [name for name in ModelBackends.model_fields if self.has_backend(name)]


def _claim_expectation(value: object) -> object:
    """Accept a string or a non-empty list of strings; say clearly what else was given."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list matches nothing; give one or more strings")
        bad = [v for v in value if not isinstance(v, str)]
        if not bad:
            return value
        value = bad[0]
    # NOTE: YAML turns unquoted yes/no/on/off/1 into booleans and numbers (``NO`` becomes
    # false). Guessing the intended string could match a value the author never meant, so
    # the author has to quote it.
    raise ValueError(
        f"expected a string or a list of strings, got {_yaml_value(value)}; "
        "quote such values in YAML (for example '1' or 'true')"
    )


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return f"{'integer' if isinstance(value, int) else 'number'} {value!r}"
    return "a mapping" if isinstance(value, dict) else f"a {type(value).__name__}"


ClaimExpectation = Annotated[str | list[str], BeforeValidator(_claim_expectation)]


def _default_backends() -> list[BackendName]:
    return ["jwt"]


class Rule(_Strict):
    name: str = Field(min_length=1)
    issuer: str
    subject: str | None = None
    subject_pattern: str | None = None
    claims: dict[str, ClaimExpectation] = Field(default_factory=dict)
    models: list[str] = Field(min_length=1)
    actions: list[str] = Field(min_length=1)
    datasets: list[str] = Field(default_factory=list)
    backends: list[BackendName] = Field(default_factory=_default_backends, min_length=1)

    @field_validator("subject")
    @classmethod
    def _literal_subject(cls, subject: str | None) -> str | None:
        # ``subject`` is compared exactly; a wildcard here is almost surely meant as a glob and
        # would leave a rule that silently never matches.
        if subject is not None and ("*" in subject or "?" in subject):
            raise ValueError(f"{subject!r} contains a wildcard; use subject_pattern for globs")
        return subject

    @model_validator(mode="after")
    def _one_subject(self) -> Rule:
        if (self.subject is None) == (self.subject_pattern is None):
            raise ValueError("give exactly one of subject and subject_pattern")
        return self


class TierConfig(_Strict):
    max_ttl: Duration
    """A cap on every action of this tier, on top of the action's own max_ttl."""


class WebhookConfig(_Strict):
    url: str = Field(pattern=r"^https?://\S+$")
    secret_file: Path
    """The Standard Webhooks signing secret (``whsec_`` + base64), relative to the policy file;
    read and checked when the policy loads (the secret itself never enters the policy)."""
    timeout: Duration = 5
    retries: int = Field(default=3, ge=0, le=10)


class ApprovalSettings(_Strict):
    pending_ttl: Duration = 86400
    """A request not decided within this expires."""
    approved_ttl: Duration = 3600
    """An approved request not used within this expires."""
    rollback_test_max_age: Duration = 7 * 86400
    """Evidence that rolling back was exercised must be at most this old when approved."""
    webhook: WebhookConfig | None = None
    """Called (signed JSON POST, never with tokens) when a request is opened and when it
    resolves."""


class IdentityRef(_Strict):
    """One identity of a person: a subject of an issuer, or a workload claim naming them
    (e.g. GitHub's ``actor`` claim for a workflow the person triggered)."""

    issuer: str
    subject: str | None = None
    claim: str | None = None
    value: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> IdentityRef:
        if (self.subject is None) == (self.claim is None) or (self.claim is None) != (
            self.value is None
        ):
            raise ValueError("give either subject, or claim and value")
        return self


class ScopedRoleGroup(_Strict):
    """A group whose role covers some models only (``{group: vendor-ops, models: [vendor-*]}``):
    delegated administration, docs/policy.md "roles"."""

    group: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    """Globs (docs/policy.md "Globs") of the models the role covers."""


RoleGroup = str | ScopedRoleGroup


class Policy(_Strict):
    """A validated policy file.

    Build it with :func:`broker.policy.load_policy`, which also checks the cross-references
    between sections; a bare ``Policy.model_validate`` does not.
    """

    issuers: list[IssuerConfig] = Field(min_length=1)
    actions: dict[str, ActionConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list)
    roles: dict[RoleName, list[RoleGroup]] = Field(default_factory=dict)
    """Role → groups: a plain group holds the role for every model, a ScopedRoleGroup for its
    models only."""
    tiers: dict[Tier, TierConfig] = Field(default_factory=dict)
    approval: ApprovalSettings = Field(default_factory=ApprovalSettings)
    people: dict[str, list[IdentityRef]] = Field(default_factory=dict)
    """Person name → their identities, so that nobody reviews their own request through a
    second identity."""
    explain_denials: bool | None = None
    """Tell refused callers the policy's expected values (which rule wanted what). Default:
    only in dev mode; otherwise they go to the audit log and admins (docs/security.md)."""

    def issuer_by_url(self, url: str) -> IssuerConfig | None:
        return next((i for i in self.issuers if i.issuer == url), None)

    def issuer_by_name(self, name: str) -> IssuerConfig | None:
        return next((i for i in self.issuers if i.name == name), None)
