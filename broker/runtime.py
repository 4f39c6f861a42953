"""Builds every part of a broker from settings, once, for the API and the CLI."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from broker.approvals.rollback_tests import RollbackTests
from broker.approvals.service import ApprovalService
from broker.approvals.webhook import WebhookNotifier
from broker.audit.log import AuditLog
from broker.audit.publish import Publisher, Target, targets_from_settings
from broker.audit.state import StateWatch
from broker.backends.base import Backend, BackendRegistry, CachedProbe, HealthChecked
from broker.backends.jwt import JwtBackend
from broker.backends.keys import KeyRing
from broker.dev.issuer import DevIssuer, dev_issuer_key
from broker.errors import BackendUnavailable, ConfigError
from broker.grants.refusals import RefusalBudget
from broker.grants.service import GrantService, utcnow
from broker.identity.jwks import JWKSCache
from broker.identity.verifier import Verifier
from broker.keys.kek import broker_kek
from broker.keys.legacy import import_data_dir
from broker.keys.store import KeyStore
from broker.maintenance import Maintenance, role_lock
from broker.metrics import Metrics
from broker.policy import LoadedPolicy, load_policy
from broker.settings import Settings
from broker.store.db import Store
from broker.store.files import owner_only
from broker.store.lease import Leases

if TYPE_CHECKING:
    from broker.backends.vault import VaultBackend

log = logging.getLogger("broker")


@dataclass
class Broker:
    settings: Settings
    policy: LoadedPolicy
    store: Store
    keys: KeyRing
    verifier: Verifier
    grants: GrantService
    metrics: Metrics
    audit: AuditLog
    approvals: ApprovalService
    rollback_tests: RollbackTests
    notifier: WebhookNotifier | None
    dev_issuer: DevIssuer | None
    refusals: RefusalBudget
    state: StateWatch
    leases: Leases
    keystore: KeyStore
    """The sealed keys (for the parts that fetch their own, such as the console's)."""
    publisher: Publisher | None = None
    store_ready: CachedProbe = field(init=False)
    """The store's write probe, cached like the backends' (see :meth:`readiness`)."""
    maintenance: Maintenance = field(init=False)

    def __post_init__(self) -> None:
        self.store_ready = CachedProbe(self.store.probe_write)
        self.maintenance = Maintenance(self, self.leases)

    @property
    def issuer_url(self) -> str:
        return str(self.settings.issuer_url)

    def readiness(self) -> dict[str, str]:
        """Each part that exchanges need, ``"ok"`` or what is wrong with it: ``store`` (a
        write can commit), ``signing_key``, and every external backend enabled (``vault``,
        ``aws``: reachable, answering). Each probe is cheap and cached for a few seconds."""
        checks = {"store": self.store_ready() or "ok"}
        checks["signing_key"] = "ok" if self.keys.current is not None else "no signing key"
        for backend in self.grants.backends.all():
            if isinstance(backend, HealthChecked):
                checks[backend.name] = backend.ready() or "ok"
        problems = self.audit.integrity.problems()
        checks["audit"] = "; ".join(problems.values()) if problems else "ok"
        return checks

    def notices(self) -> dict[str, str]:
        """What is wrong but does not stop exchanges (``/readyz`` shows it and stays 200):
        checkpoint publication that is behind or unprotected, emergency uses not ratified."""
        notices = self.publisher.notices() if self.publisher is not None else {}
        return {**notices, **self.grants.emergency.notices()}

    def maintain(self) -> None:
        """One round of housekeeping (:meth:`broker.maintenance.Maintenance.round`): the
        singleton jobs when this process holds the maintenance lease, and its own part."""
        self.maintenance.round()

    def record_refusals(self) -> None:
        """Write the summaries of refusals no event recorded one by one (see
        :mod:`broker.grants.refusals`); kept for the next round if the store fails."""
        summaries = self.refusals.drain()
        if not summaries:
            return
        try:
            with self.store.write() as session:
                now = dt.datetime.now(dt.UTC)
                for summary in summaries:
                    self.audit.append(session, "refusals.summary", now, summary)
        except Exception:
            self.refusals.restore(summaries)
            raise

    def start_maintenance(self) -> None:
        """Run maintenance in a daemon thread (:meth:`broker.maintenance.Maintenance.start`)."""
        self.maintenance.start()

    def close(self) -> None:
        self.maintenance.close()
        self.grants.close()
        try:
            self.record_refusals()
        except Exception:
            log.exception("could not record the last refusal summaries")
        if self.notifier is not None:
            self.notifier.close()
        if self.publisher is not None:
            self.publisher.close()
        for backend in self.grants.backends.all():
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        self.store.close()


def audit_origin(issuer_url: str) -> str:
    """The checkpoint origin (and note key name): the broker's host and path, plus /audit."""
    parts = urlsplit(issuer_url)
    return f"{parts.netloc}{parts.path.rstrip('/')}/audit"


def prepare_data_dir(path: Path) -> None:
    """Create the data dir if needed and make it 0700 (see :func:`owner_only`)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner_only(path, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create data dir {path}: {exc.strerror}") from exc


def vault_backend(settings: Settings, policy: LoadedPolicy) -> VaultBackend:
    """The vault backend from VAULT_ADDR and the broker's own Vault auth: a JWT login
    (BROKER_VAULT_JWT_ROLE + BROKER_VAULT_JWT_FILE) or VAULT_TOKEN. Checks it can log in and is
    not root; logs drift between Vault and what the policy renders. Raises ConfigError."""
    # Imported here: hvac costs memory and start-up time that brokers without vault need not pay.
    from broker.backends.vault import VaultBackend, token_source, vault_config  # noqa: PLC0415

    assert settings.vault_addr is not None
    source = token_source(settings)
    backend = VaultBackend(
        settings.vault_addr,
        source,
        policy,
        config=vault_config(policy.policy),
        verify=settings.vault_cacert or True,
    )
    try:
        backend.check()
        for line in backend.drift():
            log.warning("vault drift: %s", line)
    except BackendUnavailable as exc:
        # Vault down at start-up must not stop jwt exchanges; vault ones get 503 until it is back.
        log.warning("vault is unavailable at start-up: %s", exc.description)
    return backend


def _publisher(targets: list[Target], store: Store, audit: AuditLog) -> Publisher | None:
    """The checkpoint publisher for ``targets``, hooked to the log so that every checkpoint
    signed is queued in its own transaction; None without targets."""
    if not targets:
        return None
    publisher = Publisher(store, targets, integrity=audit.integrity)
    audit.on_signed.append(publisher.enqueue)
    publisher.refresh()
    return publisher


def build_broker(settings: Settings) -> Broker:
    """Load the policy, open and migrate the store, load keys. Raises ConfigError/PolicyError."""
    settings = settings.resolved()
    assert settings.policy is not None and settings.database_url is not None
    prepare_data_dir(settings.data_dir)
    policy = load_policy(settings.policy, dev_mode=settings.dev)
    targets = targets_from_settings(
        settings.audit_publish_s3,
        settings.audit_publish_s3_retention_days,
        settings.audit_publish_url,
    )
    kek = broker_kek(settings)
    store = Store(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    store.migrate()
    leases = Leases(store)
    sealed, origin = KeyStore(store, kek), audit_origin(str(settings.issuer_url))
    import_data_dir(settings.data_dir, sealed, origin)
    keys = KeyRing(sealed)
    audit = AuditLog.from_store(sealed, data_dir=settings.data_dir, default_origin=origin)
    dev_key = dev_issuer_key(sealed) if settings.dev else None
    dev_issuer = DevIssuer(dev_key, policy) if dev_key else None
    jwks = JWKSCache(static=dev_issuer.static_key_sets() if dev_issuer else None)
    verifier = Verifier(policy.policy, jwks, roles_for=policy.roles_for)
    metrics = Metrics(policy.policy.models, policy.policy.actions, policy.digest)
    metrics.watch_keys(jwks, policy.policy.issuers)
    enabled: dict[str, Backend] = {"jwt": JwtBackend(keys, str(settings.issuer_url))}
    if settings.vault_addr:
        enabled["vault"] = vault_backend(settings, policy)
    if any(m.backends.aws for m in policy.policy.models.values()):
        # The broker's own AWS access: the default credential chain (AWS_ENDPOINT_URL and
        # AWS_REGION honoured); never keys from the policy file. Imported here, like vault's.
        from broker.backends.aws import AwsBackend  # noqa: PLC0415

        enabled["aws"] = AwsBackend(policy, role_lock=role_lock(leases))
    backends = BackendRegistry(enabled, observe=metrics.backend_call)
    webhook, secret = policy.policy.approval.webhook, policy.webhook_secret
    notifier = WebhookNotifier(webhook, secret) if webhook and secret else None
    rollback_tests = RollbackTests(policy=policy, store=store, audit=audit, clock=utcnow)
    approvals = ApprovalService(
        policy=policy,
        store=store,
        audit=audit,
        notifier=notifier,
        rollback_tests=rollback_tests,
        clock=utcnow,
    )
    grants = GrantService(
        policy=policy,
        verifier=verifier,
        store=store,
        backends=backends,
        audit=audit,
        approvals=approvals,
        explain_denials=settings.dev
        if policy.policy.explain_denials is None
        else policy.policy.explain_denials,
    )
    publisher = _publisher(targets, store, audit)
    state = StateWatch(store, audit.integrity)
    metrics.watch_audit(audit, publisher)
    metrics.watch_store(store, [target.name for target in targets])
    metrics.watch_emergencies(grants.emergency)
    with store.read() as session:
        audit.check(session)  # NOTE: before anything is appended; the verdict is cached
    with store.write() as session:
        audit.append(
            session,
            "policy.loaded",
            dt.datetime.now(dt.UTC),
            {"digest": policy.digest, "source": policy.source, "dev": settings.dev},
        )
    if settings.dev:
        log.warning(
            "DEV MODE: a built-in issuer hands out workload and admin tokens to anyone who can "
            "reach %s. Never use --dev for real credentials.",
            settings.issuer_url,
        )
    return Broker(
        settings=settings,
        policy=policy,
        store=store,
        keys=keys,
        verifier=verifier,
        grants=grants,
        metrics=metrics,
        audit=audit,
        approvals=approvals,
        rollback_tests=rollback_tests,
        notifier=notifier,
        dev_issuer=dev_issuer,
        refusals=RefusalBudget(burst=settings.refusal_burst, rate=settings.refusal_rate),
        state=state,
        leases=leases,
        keystore=sealed,
        publisher=publisher,
    )
