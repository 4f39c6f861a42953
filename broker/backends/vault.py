"""The ``vault`` backend: OpenBao/Vault tokens and dynamic database logins, one per grant.

How it maps the policy file onto Vault (setup, the broker's own minimum policy, revocation and
failure modes are in ``docs/backends/vault.md``):

- each (model, action) has one Vault policy, ``broker-<model>-<action>``, rendered from the
  model's ``policy_paths`` and the action's capabilities by :func:`render_policy`. The same
  renderer (through :func:`plan_vault`) feeds the Terraform module, the test setup and
  :meth:`VaultBackend.drift`, so what Vault enforces cannot silently part from the policy file;
- a token is created through a token role whose ``allowed_policies`` bound what the broker can
  ever hand out: an orphan, non-renewable service token that lives exactly as long as its grant
  and carries the grant id in its metadata, so Vault's own audit log attributes every use of it;
- a (model, action) configured with a database role gets a dynamic database login instead of a
  token (see :class:`DatabaseAccess`);
- the broker keeps only a non-secret ``credential_ref``: the token accessor, or the lease id.

hvac is confined to this module. Every Vault or network failure becomes
:class:`~broker.errors.BackendUnavailable` naming the Vault address and the path that failed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import hvac
import hvac.exceptions

from broker.backends.base import TOKEN_TYPE_VAULT, CachedProbe, Credential
from broker.backends.vault_http import VaultTransport, VaultUnreachable
from broker.errors import AccessDenied, BackendUnavailable, ConfigError, InvalidRequest
from broker.grants.model import Grant
from broker.policy import LoadedPolicy
from broker.policy.model import Policy, VaultBackendConfig

if TYPE_CHECKING:
    from broker.settings import Settings

TOKEN_TYPE_DATABASE = "urn:broker:token-type:database-credentials"  # noqa: S105 (a URN)
BROKER_MARKER = "model-credential-broker"
"""The ``broker`` metadata value on every token the broker creates; ``list_live`` looks for it."""
POLICY_PREFIX = "broker-"
SUBJECT_METADATA_CHARS = 128
"""Vault keeps token metadata in every audit entry; a subject longer than this is cut."""
MAX_CONNECTIONS = 64
"""Keep-alive connections to Vault kept open (at least the API's exchange threads)."""
HEALTH_TIMEOUT_S = 2.0
"""How long the readiness probe waits for ``sys/health``: an answer takes milliseconds."""
_HEALTH_STATES = {
    472: "a disaster-recovery secondary",
    501: "not initialised",
    503: "sealed",
    530: "removed from its cluster",
}

# NOTE: no ``sudo`` (root-protected paths) and no ``deny``: a broker-issued token only ever gets
# ordinary data capabilities. Listed in the order Vault's docs use, which is also render order.
CAPABILITIES = ("create", "read", "update", "patch", "delete", "list")
# NOTE: paths under these would hand a workload control over Vault itself (policies, auth
# methods, leases, identities), not access to model data.
FORBIDDEN_PATH_PREFIXES = ("sys/", "auth/", "identity/", "cubbyhole/")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_ACCESSOR = re.compile(r"[A-Za-z0-9.]{8,128}")
_LOGIN_REFRESH_FRACTION = 2 / 3
"""A login is renewed after this fraction of its TTL (about when Vault Agent renews)."""

T = TypeVar("T")


# --- what the broker hands out, per action -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionAccess:
    """What a token for one action may do.

    ``capabilities`` apply to each of the model's ``policy_paths``. ``subpaths`` name paths
    relative to each policy path (its trailing ``*`` dropped), each with capabilities *added* to
    ``capabilities`` there: Vault applies only the most specific matching path, so the renderer
    writes the union. ``num_uses`` limits how many requests a token may make (None: no limit).
    """

    capabilities: tuple[str, ...]
    subpaths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    num_uses: int | None = None


_WRITE = ("create", "update", "read")
DEFAULT_ACTION_ACCESS: Mapping[str, ActionAccess] = MappingProxyType(
    {
        "evaluate": ActionAccess(("read", "list")),
        "fine-tune": ActionAccess(("read", "list"), {"checkpoints/*": _WRITE}),
        "deploy-weights": ActionAccess(("read", "list"), {"weights/*": _WRITE}),
        "edit-safety-filter": ActionAccess(("read", "list"), {"safety-filter/*": _WRITE}),
    }
)


@dataclass(frozen=True, slots=True)
class DatabaseAccess:
    """A model whose ``actions`` get a dynamic database login from Vault's database role ``role``.

    Other actions on the model still get tokens. Until the policy file carries these settings
    (``database_role``/``database_actions`` on a model's ``vault`` section), they are given to
    :class:`VaultConfig` as ``databases``.
    """

    role: str
    actions: frozenset[str]


@dataclass(frozen=True, slots=True)
class VaultConfig:
    """Names and mappings the backend, the test setup and Terraform share. All have defaults.
    :func:`vault_config` builds one from a policy's models."""

    token_role: str = "broker-issuer"  # noqa: S105 (a role name)
    """The token role tokens are created through (``auth/token/create/<token_role>``)."""
    database_mount: str = "database"
    action_access: Mapping[str, ActionAccess] = field(default_factory=lambda: DEFAULT_ACTION_ACCESS)
    databases: Mapping[str, DatabaseAccess] = field(default_factory=dict)
    """Model name → its database access."""
    broker_policy: str = "model-credential-broker"
    """The name of the broker's own Vault policy (see :func:`render_broker_policy`)."""
    broker_jwt_mount: str = "jwt"
    broker_jwt_role: str = "model-credential-broker"
    broker_token_ttl: int = 900
    """TTL (seconds) of the broker's own token from its JWT login; it logs in again before."""


def vault_config(policy: Policy) -> VaultConfig:
    """The VaultConfig a policy asks for: its models' ``database_role``/``database_actions``."""
    databases = {
        name: DatabaseAccess(
            model.backends.vault.database_role, frozenset(model.backends.vault.database_actions)
        )
        for name, model in policy.models.items()
        if model.backends.vault is not None and model.backends.vault.database_role
    }
    return VaultConfig(databases=databases)


# --- rendering (pure) ----------------------------------------------------------------------------


def policy_name(model: str, action: str) -> str:
    """``broker-<model>-<action>``. Raises ConfigError when a name cannot be a Vault policy name."""
    for kind, value in (("model", model), ("action", action)):
        if not _NAME.fullmatch(value):
            raise ConfigError(
                f"{kind} name {value!r} cannot be part of a Vault policy name: use lowercase "
                "letters, digits, '.', '_' and '-'"
            )
    return f"{POLICY_PREFIX}{model}-{action}"


def render_policy(
    model: str, action: str, vault: VaultBackendConfig, config: VaultConfig
) -> tuple[str, str]:
    """The Vault policy ``(name, hcl)`` for tokens of ``action`` on ``model``.

    A (model, action) with database access gets only ``read`` on its database role's
    ``creds`` path: that token never leaves the broker (see :meth:`VaultBackend.issue`).

    Raises:
        ConfigError: a bad name, no access configured for ``action``, or a policy path that
            would reach Vault's own control paths.
    """
    name = policy_name(model, action)
    database = config.databases.get(model)
    if database is not None and action in database.actions:
        rules: dict[str, tuple[str, ...]] = {_creds_path(config, database.role): ("read",)}
    else:
        access = config.action_access.get(action)
        if access is None:
            raise ConfigError(
                f"the vault backend has no capabilities for action {action!r}; add it to "
                f"its action_access (known: {sorted(config.action_access)})"
            )
        rules = _access_rules(model, action, vault.policy_paths, access)
    header = (
        f"# Rendered by the model-credential broker for model {model}, action {action}.\n"
        "# Change the broker's policy file and render again; do not edit this policy.\n"
    )
    return name, header + "\n".join(_hcl_path(path, caps) for path, caps in rules.items())


def render_broker_policy(config: VaultConfig, database_roles: Iterable[str]) -> str:
    """The broker's own Vault policy: the least it needs to issue, revoke and reconcile.

    Every path is explained in ``docs/backends/vault.md``.
    """
    role = config.token_role
    blocks = [
        "# What the model-credential broker's own Vault token may do. Nothing else.",
        _hcl_path(f"auth/token/create/{role}", ("update",)),
        _hcl_path("auth/token/lookup-accessor", ("update",)),
        _hcl_path("auth/token/revoke-accessor", ("update",)),
        _hcl_path("auth/token/accessors", ("list", "sudo")),
        _hcl_path("auth/token/lookup-self", ("read",)),
        _hcl_path(f"auth/token/roles/{role}", ("read",)),
        _hcl_path(f"sys/policies/acl/{POLICY_PREFIX}*", ("read",)),
    ]
    for db_role in sorted(set(database_roles)):
        lease_prefix = _creds_path(config, db_role)
        blocks.append(_hcl_path(f"sys/leases/renew/{lease_prefix}/*", ("update",)))
        blocks.append(_hcl_path(f"sys/leases/revoke/{lease_prefix}/*", ("update",)))
    return "\n".join(blocks)


@dataclass(frozen=True, slots=True)
class TokenRoleSpec:
    """The token role every broker-issued token is created through."""

    name: str
    allowed_policies: tuple[str, ...]
    token_explicit_max_ttl: int
    orphan: bool = True
    renewable: bool = False
    token_type: str = "service"  # noqa: S105 (a token kind)
    """Service tokens have accessors (batch tokens cannot be revoked or looked up)."""


@dataclass(frozen=True, slots=True)
class DatabaseRoleSpec:
    """A Vault database role the broker reads logins from; its statements are deployment's."""

    name: str
    default_ttl: int
    max_ttl: int


@dataclass(frozen=True, slots=True)
class VaultPlan:
    """Everything that must exist in Vault for one policy file: the single source of the names,
    policies and TTLs that the backend, the test setup and ``terraform/vault`` all use."""

    policies: Mapping[str, str]
    """Policy name → HCL, one per (model, action)."""
    policy_for: Mapping[tuple[str, str], str]
    database_for: Mapping[tuple[str, str], str]
    """(model, action) → database role, for those that get database logins."""
    token_role: TokenRoleSpec
    database_roles: tuple[DatabaseRoleSpec, ...]
    broker_policy_name: str
    broker_policy: str
    config: VaultConfig


def plan_vault(policy: Policy, config: VaultConfig) -> VaultPlan:
    """Render what Vault must hold for ``policy``: every model with a ``vault`` section, times
    every action of the policy that has access configured (or database access for the model).

    Raises:
        ConfigError: a name is unusable, two (model, action) pairs render to the same policy
            name, a policy path is forbidden, or database access names an unknown action.
    """
    policies: dict[str, str] = {}
    policy_for: dict[tuple[str, str], str] = {}
    database_for: dict[tuple[str, str], str] = {}
    db_ttls: dict[str, int] = {}
    for model, model_cfg in sorted(policy.models.items()):
        vault = model_cfg.backends.vault
        if vault is None:
            continue
        database = config.databases.get(model)
        _check_database_actions(model, database, policy)
        for action, action_cfg in sorted(policy.actions.items()):
            is_db = database is not None and action in database.actions
            if not is_db and action not in config.action_access:
                continue
            name, hcl = render_policy(model, action, vault, config)
            if name in policies:
                other = next(pair for pair, n in policy_for.items() if n == name)
                raise ConfigError(
                    f"model {model!r} action {action!r} and model {other[0]!r} action "
                    f"{other[1]!r} both render to Vault policy {name!r}; rename one"
                )
            policies[name] = hcl
            policy_for[model, action] = name
            if is_db:
                assert database is not None
                database_for[model, action] = database.role
                db_ttls[database.role] = max(db_ttls.get(database.role, 0), action_cfg.max_ttl)
    max_ttl = max(
        (policy.actions[action].max_ttl for _, action in policy_for),
        default=min(a.max_ttl for a in policy.actions.values()),
    )
    return VaultPlan(
        policies=MappingProxyType(policies),
        policy_for=MappingProxyType(policy_for),
        database_for=MappingProxyType(database_for),
        token_role=TokenRoleSpec(
            name=config.token_role,
            allowed_policies=tuple(sorted(policies)),
            token_explicit_max_ttl=max_ttl,
        ),
        database_roles=tuple(DatabaseRoleSpec(r, t, t) for r, t in sorted(db_ttls.items())),
        broker_policy_name=config.broker_policy,
        broker_policy=render_broker_policy(config, db_ttls),
        config=config,
    )


def _check_database_actions(model: str, database: DatabaseAccess | None, policy: Policy) -> None:
    if database is None:
        return
    unknown = sorted(database.actions - set(policy.actions))
    if unknown:
        raise ConfigError(f"database access for model {model!r} names unknown actions {unknown}")
    if not _NAME.fullmatch(database.role):
        raise ConfigError(f"database role name {database.role!r} is not a plain Vault name")


def _access_rules(
    model: str, action: str, paths: Iterable[str], access: ActionAccess
) -> dict[str, tuple[str, ...]]:
    _check_capabilities(action, access.capabilities)
    rules: dict[str, set[str]] = {}
    for path in paths:
        _check_policy_path(model, path)
        rules.setdefault(path, set()).update(access.capabilities)
        prefix = path.removesuffix("*").rstrip("/") + "/"
        for sub, caps in access.subpaths.items():
            _check_capabilities(action, caps)
            rules.setdefault(prefix + sub.lstrip("/"), set()).update(access.capabilities, caps)
    return {path: tuple(c for c in CAPABILITIES if c in caps) for path, caps in rules.items()}


def _check_capabilities(action: str, caps: Iterable[str]) -> None:
    bad = sorted(set(caps) - set(CAPABILITIES))
    if bad:
        raise ConfigError(
            f"action {action!r}: capabilities {bad} are not allowed for broker-issued tokens "
            f"(allowed: {', '.join(CAPABILITIES)})"
        )


def _check_policy_path(model: str, path: str) -> None:
    where = f"models.{model}.backends.vault.policy_paths"
    if path.startswith(FORBIDDEN_PATH_PREFIXES) or path.lstrip("/").startswith(("*", "+")):
        raise ConfigError(
            f"{where}: {path!r} would reach Vault's own control paths or every mount; "
            "name the model's data paths (for example secret/data/models/<model>/*)"
        )
    if "{{" in path or not path.isprintable():
        raise ConfigError(
            f"{where}: {path!r} must be a plain Vault path (no templates, no control characters)"
        )


def _creds_path(config: VaultConfig, db_role: str) -> str:
    return f"{config.database_mount}/creds/{db_role}"


def _hcl_path(path: str, caps: tuple[str, ...]) -> str:
    # NOTE: json.dumps quotes and escapes exactly as an HCL string literal needs, so no path can
    # close the string and add rules of its own.
    return f"path {json.dumps(path)} {{\n  capabilities = {json.dumps(list(caps))}\n}}\n"


# --- the broker's own login ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VaultLogin:
    """A Vault token for the broker itself, and when to log in again (None: never)."""

    token: str = field(repr=False)
    refresh_at: dt.datetime | None = None


class TokenSource(Protocol):
    """How the broker gets its own Vault token. ``client`` is an hvac client with no token."""

    @property
    def where(self) -> str:
        """Where the token comes from, for error messages."""
        ...

    def login(self, client: Any) -> VaultLogin: ...


@dataclass(frozen=True, slots=True)
class StaticToken:
    """A token given to the broker (``VAULT_TOKEN``, or a Vault Agent sink); never refreshed.

    Keep it short-lived or periodic and renewed by Vault Agent; the broker refuses a root token.
    """

    token: str = field(repr=False)

    @property
    def where(self) -> str:
        return "its static token"

    def login(self, client: Any) -> VaultLogin:
        return VaultLogin(self.token)


@dataclass(frozen=True, slots=True)
class JwtLogin:
    """Log in with Vault's JWT auth (``auth/<mount>/login``) using a workload identity token.

    ``jwt`` is called at every login, so a projected token file that rotates is read afresh.
    """

    role: str
    jwt: Callable[[], str] = field(repr=False)
    mount: str = "jwt"

    @property
    def where(self) -> str:
        return f"auth/{self.mount}/login"

    def login(self, client: Any) -> VaultLogin:
        response = client.auth.jwt.jwt_login(
            self.role, self.jwt(), use_token=False, path=self.mount
        )
        auth = response["auth"]
        ttl = int(auth["lease_duration"])
        refresh_at = _now() + dt.timedelta(seconds=ttl * _LOGIN_REFRESH_FRACTION)
        return VaultLogin(str(auth["client_token"]), refresh_at)


def token_source(settings: Settings) -> TokenSource:
    """The broker's own Vault auth from its settings: a JWT login (BROKER_VAULT_JWT_ROLE +
    BROKER_VAULT_JWT_FILE, preferred) or VAULT_TOKEN. Raises ConfigError when neither is set."""
    if settings.vault_jwt_role and settings.vault_jwt_file:
        jwt_file = settings.vault_jwt_file
        return JwtLogin(
            settings.vault_jwt_role,
            lambda: jwt_file.read_text().strip(),
            mount=settings.vault_jwt_mount,
        )
    if settings.vault_token is not None:
        return StaticToken(settings.vault_token.get_secret_value())
    raise ConfigError(
        "VAULT_ADDR is set but the broker has no Vault auth: set BROKER_VAULT_JWT_ROLE and "
        "BROKER_VAULT_JWT_FILE (preferred) or VAULT_TOKEN"
    )


# --- the backend ---------------------------------------------------------------------------------


class VaultBackend:
    """Issues and revokes Vault tokens and database logins for grants; see the module docs.

    Safe to share between threads. Construction does no I/O; call :meth:`check` at start-up.
    """

    name = "vault"
    token_type = TOKEN_TYPE_VAULT
    external = True

    def __init__(
        self,
        addr: str,
        token_source: TokenSource,
        policy: LoadedPolicy,
        *,
        config: VaultConfig | None = None,
        timeout: float = 5.0,
        verify: bool | str = True,
    ) -> None:
        """Raises ConfigError when the policy cannot be mapped onto Vault (see plan_vault)."""
        self.addr = addr.rstrip("/")
        self.plan = plan_vault(policy.policy, config or VaultConfig())
        _check_rules_have_access(policy, self.plan)
        self._source = token_source
        self._timeout = timeout
        self._verify = verify
        self._transport = VaultTransport(verify, maxsize=MAX_CONNECTIONS)
        # NOTE: token="" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token.
        self._client = hvac.Client(
            url=self.addr, token="", timeout=timeout, verify=verify, session=self._transport
        )
        self._anonymous = self._as("")
        self._lock = threading.Lock()
        self._login: VaultLogin | None = None
        self._health = CachedProbe(self._probe_health)

    # --- Backend protocol ---

    def issue(self, grant: Grant) -> Credential:
        """A Vault token (or, where configured, a database login) for ``grant``.

        Raises:
            AccessDenied: the grant's (model, action) has no Vault policy, or it has expired.
            BackendUnavailable: Vault is unreachable, refused, or answered unexpectedly.
            ConfigError: the broker's token is a root token.
        """
        key = (grant.model, grant.action)
        name = self.plan.policy_for.get(key)
        if name is None:
            raise AccessDenied(
                f"model {grant.model} has no Vault policy for action {grant.action}",
                backend=self.name,
            )
        ttl = int((grant.expires_at - _now()).total_seconds())
        if ttl < 1:
            raise AccessDenied(f"grant {grant.id} has expired", backend=self.name)
        db_role = self.plan.database_for.get(key)
        if db_role is not None:
            return self._issue_database(grant, name, db_role, ttl)
        access = self.plan.config.action_access[grant.action]
        auth = self._create_token(grant, name, ttl, kind="token", num_uses=access.num_uses or 0)
        return Credential(
            access_token=str(auth["client_token"]),
            issued_token_type=TOKEN_TYPE_VAULT,
            token_type="Bearer",  # noqa: S106 (a scheme name)
            expires_at=_expiry(grant, ttl, int(auth["lease_duration"])),
            credential_ref=str(auth["accessor"]),
            extra={"policies": list(auth["token_policies"])},
        )

    def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
        """Make ``grant``'s credential stop working in Vault. True once Vault confirmed; a token
        or lease that is already gone counts as confirmed.

        With no ``credential_ref``, revokes every live token that carries the grant's id.

        Raises:
            AccessDenied: the accessor belongs to another grant or was not issued by the broker.
            InvalidRequest: ``credential_ref`` is neither a token accessor nor one of this
                backend's leases.
            BackendUnavailable: Vault is unreachable or refused.
        """
        if credential_ref is None:
            refs = [ref for gid, ref in self.list_live() if gid == grant.id]
            return all([self.revoke_ref(grant.id, ref) for ref in refs])
        return self.revoke_ref(grant.id, credential_ref)

    # --- reconciliation ---

    def revoke_ref(self, grant_id: str, credential_ref: str) -> bool:
        """Revoke one credential of ``grant_id`` by reference (a pair from :meth:`list_live`).

        Raises the same errors as :meth:`revoke`.
        """
        if credential_ref.startswith(self._lease_prefixes()):
            # NOTE: the path form (not the body form) lets the broker's policy allow revoking
            # leases of its own database roles only. It is synchronous: once Vault answers, the
            # database login has been dropped.
            path = f"sys/leases/revoke/{credential_ref}"
            self._vault("revoke a lease", path, lambda c: c.adapter.put(f"/v1/{path}"))
            return True
        if not _ACCESSOR.fullmatch(credential_ref):
            raise InvalidRequest(
                f"{credential_ref!r} is neither a Vault token accessor nor a lease of "
                f"{', '.join(self._lease_prefixes()) or 'a configured database role'}"
            )
        token = self._lookup_accessor(credential_ref)
        if token is None:
            return True
        # NOTE: Vault cannot limit revoke-accessor to one role's tokens, so the broker checks
        # that the token is its own and the grant's before revoking it.
        owner = self._grant_of(token)
        if owner != grant_id:
            whose = f"grant {owner}" if owner else "no grant: the broker did not issue it"
            raise AccessDenied(
                f"token accessor {credential_ref} belongs to {whose}, not to grant {grant_id}; "
                "not revoking it",
                backend=self.name,
            )
        self._vault(
            "revoke a token",
            "auth/token/revoke-accessor",
            lambda c: c.write_data("auth/token/revoke-accessor", data={"accessor": credential_ref}),
        )
        return True

    def list_live(self, *, min_age_s: int = 0) -> list[tuple[str, str]]:
        """``(grant_id, token accessor)`` for every live token the broker created through its
        token role, including the tokens that hold database leases (revoking such a token
        revokes its leases). Leases themselves carry no metadata, so they are found this way.

        ``min_age_s`` skips tokens younger than that: a reconciler must not revoke the token of
        an exchange whose grant is still being written.

        Raises BackendUnavailable.
        """
        listing = self._vault(
            "list token accessors", "auth/token/accessors", lambda c: c.list("auth/token/accessors")
        )
        newest = _now().timestamp() - min_age_s
        live: list[tuple[str, str]] = []
        for accessor in (listing or {}).get("data", {}).get("keys", []):
            token = self._lookup_accessor(accessor)
            grant_id = self._grant_of(token)
            if grant_id and token and int(token.get("creation_time", 0)) <= newest:
                live.append((grant_id, str(accessor)))
        return live

    # --- health ---

    def check(self) -> None:
        """Log in and look the broker's own token up; for start-up (readiness: :meth:`ready`).

        Raises:
            ConfigError: the broker's token is a root token.
            BackendUnavailable: Vault is unreachable or refuses the broker's token.
        """
        self._authenticated()

    def ready(self) -> str | None:
        """None when Vault answers ``sys/health`` as an unsealed, initialised active or standby
        node; else what is wrong. Cached (:class:`~broker.backends.base.CachedProbe`); waits
        at most :data:`HEALTH_TIMEOUT_S`. Never raises."""
        return self._health()

    def _probe_health(self) -> str | None:
        # Unauthenticated and cheap: no login, no token lookup. A standby node serves the
        # broker through redirects, so it counts as ready.
        try:
            resp = self._transport.request(
                "GET",
                f"{self.addr}/v1/sys/health",
                params={"standbyok": "true", "perfstandbyok": "true"},
                timeout=HEALTH_TIMEOUT_S,
            )
        except OSError as exc:
            return f"vault at {self.addr} is unreachable: {exc}"
        if resp.status_code == 200:
            return None
        state = _HEALTH_STATES.get(resp.status_code, f"answering HTTP {resp.status_code}")
        return f"vault at {self.addr} is {state} (sys/health)"

    def drift(self) -> list[str]:
        """How Vault differs from :attr:`plan` (policies and token role); empty when it agrees.

        Raises BackendUnavailable.
        """
        problems: list[str] = []
        for name, hcl in self.plan.policies.items():
            found = self._read("read a policy", f"sys/policies/acl/{name}")
            if found is None:
                problems.append(f"policy {name} is missing")
            # Whitespace differs harmlessly when Terraform's heredocs deliver the same text.
            elif str(found["data"]["policy"]).split() != hcl.split():
                problems.append(f"policy {name} differs from the rendered policy")
        return problems + self._token_role_drift()

    def _token_role_drift(self) -> list[str]:
        spec = self.plan.token_role
        role = self._read("read the token role", f"auth/token/roles/{spec.name}")
        if role is None:
            return [f"token role {spec.name} is missing"]
        data = role["data"]
        problems: list[str] = []
        missing = sorted(set(spec.allowed_policies) - set(data["allowed_policies"]))
        if missing:
            problems.append(f"token role {spec.name} does not allow policies {missing}")
        extra = sorted(set(data["allowed_policies"]) - set(spec.allowed_policies) - {"default"})
        if extra or data.get("allowed_policies_glob"):
            problems.append(f"token role {spec.name} allows more than the broker's policies")
        if not data["orphan"] or data["renewable"]:
            problems.append(f"token role {spec.name} must be orphan and not renewable")
        cap = int(data["token_explicit_max_ttl"])
        if cap == 0 or cap < spec.token_explicit_max_ttl:
            problems.append(
                f"token role {spec.name} has token_explicit_max_ttl {cap}s; it must be at least "
                f"the longest action TTL, {spec.token_explicit_max_ttl}s (0 means no cap)"
            )
        return problems

    def _read(self, what: str, path: str) -> Any:
        """``GET path``, or None when Vault has nothing there."""
        return self._vault(what, path, lambda c: c.read(path))

    def close(self) -> None:
        self._client.adapter.close()

    # --- internals ---

    def _issue_database(self, grant: Grant, policy: str, db_role: str, ttl: int) -> Credential:
        # NOTE: a lease belongs to the token that read it and dies with it. Reading with the
        # broker's own (short-lived, re-logged-in) token would end every login when that token
        # does. So a "carrier" token, made for this grant through the token role with the grant's
        # TTL, reads the login: the lease ends with the grant even if the broker never revokes.
        # num_uses=2 leaves it one use after the read, and Vault refuses to return a lease on a
        # token's last use (revoking it instead), so the carrier can never mint a second login.
        carrier = self._create_token(grant, policy, ttl, kind="database", num_uses=2, default=False)
        creds_path = _creds_path(self.plan.config, db_role)
        try:
            # Straight to Vault with the carrier (no broker re-login and retry): the carrier has
            # exactly one use to spare.
            reader = self._as(str(carrier["client_token"]))
            secret = self._call(
                "read a database login", creds_path, lambda: reader.read(creds_path)
            )
            if not secret:
                raise BackendUnavailable(
                    f"vault at {self.addr} has no database role at {creds_path}", backend=self.name
                )
            lease_id, lease_ttl = str(secret["lease_id"]), int(secret["lease_duration"])
            if lease_ttl > ttl:
                renew = f"sys/leases/renew/{lease_id}"
                lease_ttl = self._vault(
                    "shorten a lease to the grant's TTL",
                    renew,
                    lambda c: c.adapter.put(f"/v1/{renew}", json={"increment": ttl}),
                )["lease_duration"]
        except BaseException:
            self._discard(grant.id, str(carrier["accessor"]))
            raise
        data = secret["data"]
        return Credential(
            access_token=str(data["password"]),
            issued_token_type=TOKEN_TYPE_DATABASE,
            token_type="N_A",  # noqa: S106 (RFC 8693: not an access token)
            expires_at=_expiry(grant, ttl, lease_ttl),
            credential_ref=lease_id,
            extra={"username": str(data["username"]), "database_role": db_role},
        )

    def _create_token(
        self, grant: Grant, policy: str, ttl: int, *, kind: str, num_uses: int, default: bool = True
    ) -> dict[str, Any]:
        path = f"auth/token/create/{self.plan.token_role.name}"
        body = {
            "policies": [policy],
            "no_default_policy": not default,
            "ttl": f"{ttl}s",
            "explicit_max_ttl": f"{ttl}s",
            "renewable": False,
            "num_uses": num_uses,
            "display_name": f"broker-{grant.id}",
            "meta": {
                "broker": BROKER_MARKER,
                "grant_id": grant.id,
                "model": grant.model,
                "action": grant.action,
                "issuer": grant.issuer,
                "subject": grant.subject[:SUBJECT_METADATA_CHARS],
                "credential": kind,
            },
        }
        response = self._vault("create a token", path, lambda c: c.write_data(path, data=body))
        auth: dict[str, Any] = response["auth"]
        return auth

    def _discard(self, grant_id: str, accessor: str) -> None:
        """Best-effort revoke of a token the caller will never see; the reconciler is the net."""
        with contextlib.suppress(BackendUnavailable, AccessDenied):
            self.revoke_ref(grant_id, accessor)

    def _lookup_accessor(self, accessor: str) -> dict[str, Any] | None:
        """What Vault knows of the token (role, meta, creation_time...), or None when no token
        has this accessor (any more)."""
        path = "auth/token/lookup-accessor"
        try:
            found = self._vault(
                "look up a token",
                path,
                lambda c: c.write_data(path, data={"accessor": accessor}),
                missing_ok=True,
            )
        except _Missing:
            return None
        data: dict[str, Any] = found["data"]
        return data

    def _grant_of(self, token: dict[str, Any] | None) -> str | None:
        """The grant id of a token the broker issued through its role; None for any other."""
        if token is None or token.get("role") != self.plan.token_role.name:
            return None
        meta = token.get("meta") or {}
        grant_id = meta.get("grant_id")
        return str(grant_id) if meta.get("broker") == BROKER_MARKER and grant_id else None

    def _lease_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{_creds_path(self.plan.config, r.name)}/" for r in self.plan.database_roles)

    def _as(self, token: str) -> Any:
        return hvac.Client(
            url=self.addr,
            token=token,
            timeout=self._timeout,
            verify=self._verify,
            session=self._client.session,
        )

    def _authenticated(self, stale: VaultLogin | None = None) -> tuple[Any, VaultLogin]:
        """The shared client with a valid broker token, logging in when due or when ``stale``
        (a login Vault just refused) is still the current one."""
        with self._lock:
            login = self._login
            due = login is None or login is stale
            if login is not None and login.refresh_at is not None:
                due = due or _now() >= login.refresh_at
            if due or login is None:
                source = self._source
                login = self._call("log in", source.where, lambda: source.login(self._anonymous))
                self._refuse_root(self._as(login.token))
                # Requests already under way keep the previous token, which is still valid.
                self._client.token = login.token
                self._login = login
            return self._client, login

    def _refuse_root(self, client: Any) -> None:
        path = "auth/token/lookup-self"
        info = self._call("look up its own token", path, client.auth.token.lookup_self)
        if "root" in info["data"]["policies"]:
            # NOTE: a root token would let any bug in the broker do anything in Vault; the token
            # role and the broker policy are what bound the damage.
            raise ConfigError(
                "the broker refuses to use a Vault root token; give it a token with the "
                f"{self.plan.broker_policy_name} policy (docs/backends/vault.md)"
            )

    def _vault(
        self, what: str, path: str, call: Callable[[Any], T], *, missing_ok: bool = False
    ) -> T:
        """Run ``call`` with the authenticated client. When Vault refuses a token that the
        source can renew (it may have been revoked or expired early), log in again once."""
        client, login = self._authenticated()
        try:
            return self._call(what, path, lambda: call(client), missing_ok=missing_ok)
        except _PermissionDenied:
            if login.refresh_at is None:
                raise
        client, _ = self._authenticated(stale=login)
        return self._call(what, path, lambda: call(client), missing_ok=missing_ok)

    def _call(self, what: str, path: str, call: Callable[[], T], *, missing_ok: bool = False) -> T:
        try:
            return call()
        except hvac.exceptions.Forbidden:
            raise _PermissionDenied(
                f"vault at {self.addr} refused the broker permission to {what} at {path}: "
                "permission denied; the broker's token has expired or lacks the "
                f"{self.plan.broker_policy_name} policy (docs/backends/vault.md)",
                backend=self.name,
            ) from None
        except hvac.exceptions.VaultError as exc:
            detail = "; ".join(str(e).strip() for e in (exc.errors or [])) or type(exc).__name__
            if missing_ok and _is_missing(detail):
                raise _Missing from None
            raise BackendUnavailable(
                f"vault at {self.addr} could not {what} at {path}: {detail}", backend=self.name
            ) from None
        except OSError as exc:  # VaultUnreachable, or reading the broker's JWT file
            cause = str(exc) if isinstance(exc, VaultUnreachable) else type(exc).__name__
            raise BackendUnavailable(
                f"vault at {self.addr} is unreachable: {cause} while trying to {what} at {path}",
                backend=self.name,
            ) from None


class _PermissionDenied(BackendUnavailable):
    """Vault answered 403: the broker's policy lacks a path, or its token expired or was revoked."""


class _Missing(Exception):
    """Vault says the looked-up object does not exist."""


def _is_missing(detail: str) -> bool:
    return "invalid accessor" in detail or "invalid lease" in detail


def _check_rules_have_access(policy: LoadedPolicy, plan: VaultPlan) -> None:
    """Every action a rule allows through ``vault`` must map to a Vault policy (fail at start-up,
    not at the first request)."""
    vault_models = [m for m, cfg in policy.policy.models.items() if cfg.backends.vault]
    for compiled in policy.rules:
        if "vault" not in compiled.backends:
            continue
        for model in vault_models:
            if not any(p.fullmatch(model) for p in compiled.models):
                continue
            missing = sorted(a for a in compiled.actions if (model, a) not in plan.policy_for)
            if missing:
                raise ConfigError(
                    f"rule {compiled.rule.name!r} allows {missing} on model {model!r} through "
                    "vault, but the vault backend has no capabilities for them; add them to "
                    "its action_access"
                )


def _expiry(grant: Grant, requested: int, granted: int) -> dt.datetime:
    """The grant's expiry, unless Vault granted less than ``requested`` seconds (a role or mount
    cap): then the earlier, real one."""
    if granted >= requested:
        return grant.expires_at
    return _now() + dt.timedelta(seconds=granted)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
