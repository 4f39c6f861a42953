"""Builds every part of a broker from settings, once, for the API and the CLI."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.approvals.rollback_tests import RollbackTests
from broker.approvals.service import ApprovalService
from broker.approvals.webhook import WebhookNotifier
from broker.audit.anchor import AnchorError
from broker.audit.integrity import ANCHOR, STATE
from broker.audit.log import AuditIntegrityError, AuditLog
from broker.audit.publish import PUBLISHED, Publisher, Target, targets_from_settings
from broker.audit.state import StateWatch
from broker.backends.base import Backend, BackendRegistry, CachedProbe, HealthChecked
from broker.backends.jwt import JwtBackend
from broker.backends.keys import KeyRing
from broker.dev.issuer import DevIssuer
from broker.errors import BackendUnavailable, ConfigError
from broker.grants.emergency import EmergencyUses
from broker.grants.refusals import RefusalBudget
from broker.grants.service import GrantService, utcnow
from broker.identity.jwks import JWKSCache
from broker.identity.verifier import Verifier
from broker.policy import LoadedPolicy, load_policy
from broker.settings import Settings
from broker.store.db import Store
from broker.store.files import owner_only

if TYPE_CHECKING:
    from broker.backends.vault import VaultBackend

log = logging.getLogger("broker")
STUCK_ISSUING_S = 60
"""An ``issuing`` grant older than this is left over from a crash, not still committing."""


class Metrics:
    """Prometheus metrics in a registry of this broker's own (no process globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.exchanges = Counter(
            "broker_exchanges",
            "Token exchanges by outcome (issued, or the error code)",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_exchange_seconds",
            "Time to answer POST /v1/token",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    def watch_emergencies(self, emergency: EmergencyUses) -> None:
        """Count break-glass uses and those not ratified in time (broker.grants.emergency).
        NOTE: a hook on its own, to move wherever the metrics live."""
        used = Counter(
            "broker_emergency_uses",
            "Break-glass (emergency) issuances, by model and action",
            ["model", "action"],
            registry=self.registry,
        )
        unratified = Counter(
            "broker_emergency_unratified",
            "Emergency uses the maintenance round found not ratified in time",
            ["model", "action"],
            registry=self.registry,
        )
        emergency.on_used.append(lambda use: used.labels(use["model"], use["action"]).inc())
        emergency.on_unratified.append(
            lambda use: unratified.labels(use["model"], use["action"]).inc()
        )

    def watch_audit(self, audit: AuditLog, publisher: Publisher | None) -> None:
        """Export the audit log's integrity verdicts and publication backlog."""
        self.registry.register(_AuditMetrics(audit, publisher))


class _AuditMetrics(Collector):
    """Read at each scrape from the cached verdicts and the publisher's last round."""

    def __init__(self, audit: AuditLog, publisher: Publisher | None) -> None:
        self._audit = audit
        self._publisher = publisher

    def collect(self) -> Iterator[Metric]:
        problems = self._audit.integrity.problems()
        for name, check, text in (
            (
                "anchor_mismatch",
                ANCHOR,
                "the store disagrees with the anchor or a signed checkpoint",
            ),
            (
                "state_mismatch",
                STATE,
                "the grants, approvals or revocation tables disagree with the log",
            ),
            ("publication_conflict", PUBLISHED, "a published checkpoint of the same size differs"),
        ):
            yield GaugeMetricFamily(
                f"broker_audit_{name}", f"1 while {text}", value=check in problems
            )
        anchor = self._audit.anchor
        try:
            anchored = anchor.load() if anchor is not None else None
        except AnchorError:
            anchored = None
        yield GaugeMetricFamily(
            "broker_audit_anchor_size",
            "Tree size of the anchored checkpoint (0: none)",
            value=anchored.size if anchored else 0,
        )
        if self._publisher is None:
            return
        pending = GaugeMetricFamily(
            "broker_audit_publish_pending",
            "Signed checkpoints not yet published",
            labels=["target"],
        )
        failures = CounterMetricFamily(
            "broker_audit_publish_failures", "Failed publication attempts", labels=["target"]
        )
        for target, backlog in self._publisher.backlog.items():
            pending.add_metric([target], backlog.pending)
            failures.add_metric([target], self._publisher.failures[target])
        yield pending
        yield failures


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
    publisher: Publisher | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _last_reconcile: float = 0.0
    _worker: threading.Thread | None = None
    store_ready: CachedProbe = field(init=False)
    """The store's write probe, cached like the backends' (see :meth:`readiness`)."""

    def __post_init__(self) -> None:
        self.store_ready = CachedProbe(self.store.probe_write)

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
        """One round of housekeeping: expire grants and approvals, forget spent jtis of expired
        tokens, settle grants stuck
        ``issuing``, retry due backend revocations, reconcile backend credentials (every
        ``reconcile_interval``), sign a checkpoint if the log grew (unless the store disagrees
        with the anchor: that is reported, and the round goes on), publish due checkpoints,
        hold recent state against the log (:class:`StateWatch`), and truncate SQLite's WAL."""
        revocations = self.grants.revocations
        self.grants.expire_due()
        self.grants.purge_spent_tokens()
        self.approvals.expire_due()
        self.grants.emergency.settle_due()
        revocations.settle_stuck(older_than_s=STUCK_ISSUING_S)
        revocations.process()
        now = time.monotonic()
        if now - self._last_reconcile >= self.settings.reconcile_interval:
            self._last_reconcile = now
            for item in revocations.reconcile(min_age_s=STUCK_ISSUING_S):
                log.warning("reconciler revoked an orphan credential: %s", item)
            revocations.prune()
        self.record_refusals()
        try:
            with self.store.write() as session:
                self.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
        except AuditIntegrityError:
            pass  # reported (CRITICAL, /readyz, metric); exchanges are refused meanwhile
        if self.publisher is not None:
            self.publisher.process()
        self.state.round()
        if not self.store.truncate_wal():
            log.info("the SQLite WAL could not be truncated (a reader is using it); next round")

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
        """Run :meth:`maintain` every ``checkpoint_interval`` seconds in a daemon thread, so a
        checkpoint is never older than that bound while the log grows."""

        def loop() -> None:
            while not self._stop.wait(self.settings.checkpoint_interval):
                try:
                    self.maintain()
                except Exception:  # keep the loop alive; the next round retries
                    log.exception("maintenance round failed")

        self._worker = threading.Thread(target=loop, name="broker-maintenance", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=10)
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
    from broker.backends.vault import (  # noqa: PLC0415
        JwtLogin,
        StaticToken,
        TokenSource,
        VaultBackend,
        vault_config,
    )

    assert settings.vault_addr is not None
    source: TokenSource
    if settings.vault_jwt_role and settings.vault_jwt_file:
        jwt_file = settings.vault_jwt_file
        source = JwtLogin(
            settings.vault_jwt_role,
            lambda: jwt_file.read_text().strip(),
            mount=settings.vault_jwt_mount,
        )
    elif settings.vault_token is not None:
        source = StaticToken(settings.vault_token.get_secret_value())
    else:
        raise ConfigError(
            "VAULT_ADDR is set but the broker has no Vault auth: set BROKER_VAULT_JWT_ROLE and "
            "BROKER_VAULT_JWT_FILE (preferred) or VAULT_TOKEN"
        )
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
    store = Store(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    store.migrate()
    keys = KeyRing(settings.data_dir / "keys")
    audit = AuditLog.from_data_dir(settings.data_dir, audit_origin(str(settings.issuer_url)))
    dev_issuer = DevIssuer(settings.data_dir, policy) if settings.dev else None
    jwks = JWKSCache(static=dev_issuer.static_key_sets() if dev_issuer else None)
    verifier = Verifier(policy.policy, jwks, roles_for=policy.roles_for)
    enabled: dict[str, Backend] = {"jwt": JwtBackend(keys, str(settings.issuer_url))}
    if settings.vault_addr:
        enabled["vault"] = vault_backend(settings, policy)
    if any(m.backends.aws for m in policy.policy.models.values()):
        # The broker's own AWS access: the default credential chain (AWS_ENDPOINT_URL and
        # AWS_REGION honoured); never keys from the policy file. Imported here, like vault's.
        from broker.backends.aws import AwsBackend  # noqa: PLC0415

        enabled["aws"] = AwsBackend(policy)
    backends = BackendRegistry(enabled)
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
    metrics = Metrics()
    metrics.watch_audit(audit, publisher)
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
        publisher=publisher,
    )
