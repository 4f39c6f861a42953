"""Prometheus metrics, in a registry of this broker's own (no process globals).

NOTE: every label value comes from a fixed set: models and actions named by the policy (anything
else a caller sends is counted as ``other``), the backends ``jwt``/``vault``/``aws``, error codes
and refusal reasons that are constants of the code, the policy's issuer names and the
configured publication targets. A caller can never add a series. docs/observability.md lists
every metric.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.audit.anchor import AnchorError
from broker.audit.integrity import ANCHOR, STATE
from broker.audit.log import AuditLog
from broker.audit.publish import PUBLISHED, Publisher
from broker.backends.base import BACKEND_FOR_TOKEN_TYPE
from broker.identity.jwks import JWKSCache
from broker.policy.model import IssuerConfig
from broker.store.db import Store
from broker.store.tables import ApprovalRow, CheckpointRow, PublicationRow, RevocationRow

if TYPE_CHECKING:
    from broker.grants.emergency import EmergencyUses

OTHER = "other"
"""The label value of a model, action or backend that the policy does not name."""
STORE_CACHE_S = 5.0
"""How long the store's figures are reused between scrapes: a scrape costs at most one short
read transaction per this many seconds, however often Prometheus (or anyone) asks."""
EXCHANGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BACKEND_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The broker's metrics. ``models`` and ``actions`` are the policy's: the only values their
    labels take besides :data:`OTHER`; ``policy_digest`` is the loaded policy's."""

    def __init__(self, models: Iterable[str], actions: Iterable[str], policy_digest: str) -> None:
        self.registry = CollectorRegistry()
        self._models = frozenset(models)
        self._actions = frozenset(actions)
        Gauge(
            "broker_policy_info",
            "1, labelled with the digest of the policy this process loaded (replicas must agree)",
            ["digest"],
            registry=self.registry,
        ).labels(policy_digest).set(1)
        self.exchanges = Counter(
            "broker_exchanges",
            "Token exchanges by model, action, backend and outcome (issued, or the error code)",
            ["model", "action", "backend", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_exchange_seconds",
            "Time to answer POST /v1/token, by backend",
            ["backend"],
            buckets=EXCHANGE_BUCKETS,
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "broker_backend_call_seconds",
            "Time of each call to a credential backend (issue, revoke)",
            ["backend", "operation"],
            buckets=BACKEND_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "broker_backend_call_errors",
            "Backend calls that failed (raised, or a revocation the backend did not confirm)",
            ["backend", "operation"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "broker_refusals",
            "Refusals of POST /v1/token and /v1/introspect by endpoint and reason "
            "(rate_limited: answered 429)",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        self._backend_children: dict[tuple[str, str], Callable[[float], None]] = {}

    def exchanged(
        self, model: str, action: str, token_type: str, outcome: str
    ) -> Callable[[float], None]:
        """Count one exchange (``model``/``action``/``token_type`` as the caller asked, empty
        when its request did not parse); returns the function observing its duration.

        NOTE: the hot path: one set lookup per label and one dict lookup per exchange, the
        label children created once per combination (a bounded number)."""
        key = (
            model if model in self._models else OTHER,
            action if action in self._actions else OTHER,
            BACKEND_FOR_TOKEN_TYPE.get(token_type, OTHER),
            outcome,
        )
        children = self._children.get(key)
        if children is None:
            children = (self.exchanges.labels(*key), self.latency.labels(key[2]))
            self._children[key] = children
        children[0].inc()
        return children[1].observe

    def refused(self, endpoint: str, reason: str) -> None:
        """Count a refusal at ``endpoint`` (a path constant) for ``reason`` (a code constant)."""
        self.refusals.labels(endpoint, reason).inc()

    def backend_call(self, backend: str, operation: str, seconds: float, failed: bool) -> None:
        """A :class:`broker.backends.base.CallObserver` (every issuance: its histogram child
        is kept per label pair, like :meth:`exchanged`'s)."""
        key = (backend, operation)
        observe = self._backend_children.get(key)
        if observe is None:
            observe = self._backend_children[key] = self.backend_seconds.labels(*key).observe
        observe(seconds)
        if failed:
            self.backend_errors.labels(backend, operation).inc()

    def watch_emergencies(self, emergency: EmergencyUses) -> None:
        """Count break-glass uses and those the maintenance round found not ratified in time
        (:mod:`broker.grants.emergency`); model and action as bounded as the exchanges'."""
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

        def labels(use: Mapping[str, Any]) -> tuple[str, str]:
            model, action = use["model"], use["action"]
            return (
                model if model in self._models else OTHER,
                action if action in self._actions else OTHER,
            )

        emergency.on_used.append(lambda use: used.labels(*labels(use)).inc())
        emergency.on_unratified.append(lambda use: unratified.labels(*labels(use)).inc())

    def watch_audit(self, audit: AuditLog, publisher: Publisher | None) -> None:
        """Export the audit log's integrity verdicts and publication backlog."""
        self.registry.register(_AuditMetrics(audit, publisher))

    def watch_store(self, store: Store, targets: Sequence[str]) -> None:
        """Export the queues kept in the store (revocations, approvals, the log, publication
        to ``targets``), read at a scrape at most every :data:`STORE_CACHE_S`."""
        self.registry.register(_StoreMetrics(store, targets))

    def watch_keys(self, jwks: JWKSCache, issuers: Iterable[IssuerConfig]) -> None:
        """Export the age of each issuer's cached key set."""
        self.registry.register(_KeyMetrics(jwks, [i for i in issuers if not i.dev]))


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


@dataclass(frozen=True, slots=True)
class _StoreFigures:
    revocations: dict[str, int]
    """Revocation jobs by status (pending, failed)."""
    oldest_revocation: dt.datetime | None
    approvals_pending: int
    log_size: int
    checkpoint: tuple[int, dt.datetime] | None
    """The newest signed checkpoint's tree size and signing time."""
    publications: dict[str, tuple[int, dt.datetime | None]] = field(default_factory=dict)
    """Per target: checkpoints waiting and when the oldest of them was signed."""


def _read_figures(session: Session) -> _StoreFigures:
    jobs = session.execute(
        select(RevocationRow.status, func.count(), func.min(RevocationRow.created_at))
        .where(RevocationRow.status.in_(("pending", "failed")))
        .group_by(RevocationRow.status)
    ).all()
    approvals = session.execute(
        select(func.count()).select_from(ApprovalRow).where(ApprovalRow.status == "pending")
    ).scalar_one()
    checkpoint = session.execute(
        select(CheckpointRow.size, CheckpointRow.signed_at)
        .order_by(CheckpointRow.size.desc())
        .limit(1)
    ).first()
    publications = session.execute(
        select(PublicationRow.target, func.count(), func.min(PublicationRow.created_at))
        .where(PublicationRow.status == "pending")
        .group_by(PublicationRow.target)
    ).all()
    oldest = {status: at for status, _, at in jobs}.get("pending")
    return _StoreFigures(
        revocations={status: int(count) for status, count, _ in jobs},
        oldest_revocation=oldest,
        approvals_pending=int(approvals),
        log_size=AuditLog.size(session),
        checkpoint=(int(checkpoint[0]), checkpoint[1]) if checkpoint is not None else None,
        publications={target: (int(count), at) for target, count, at in publications},
    )


class _StoreMetrics(Collector):
    """The queues in the store, read in one short transaction at most every ``ttl`` seconds.

    NOTE: a store that fails the read must not fail the scrape (that would hide every other
    metric when they matter most): ``broker_store_scrape_error`` is 1 and the store's figures
    are left out until a read succeeds again."""

    def __init__(
        self,
        store: Store,
        targets: Sequence[str],
        *,
        ttl: float = STORE_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store = store
        self._targets = tuple(targets)
        self._ttl = ttl
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._at: float | None = None
        self._figures: _StoreFigures | None = None

    def _read(self) -> _StoreFigures | None:
        with self._lock:
            if self._at is None or self._clock() - self._at >= self._ttl:
                try:
                    with self._store.read() as session:
                        self._figures = _read_figures(session)
                except Exception:
                    self._figures = None
                self._at = self._clock()
            return self._figures

    def collect(self) -> Iterator[Metric]:
        figures = self._read()
        yield GaugeMetricFamily(
            "broker_store_scrape_error",
            "1 when the store could not be read for these metrics (its figures are left out)",
            value=figures is None,
        )
        if figures is None:
            return
        now = self._now()

        def age(at: dt.datetime | None) -> float:
            return max(0.0, (now - at).total_seconds()) if at is not None else 0.0

        yield GaugeMetricFamily(
            "broker_revocations_pending",
            "Backend revocation jobs waiting for the backend to confirm",
            value=figures.revocations.get("pending", 0),
        )
        yield GaugeMetricFamily(
            "broker_revocation_oldest_pending_seconds",
            "Age of the oldest pending backend revocation job (0: none)",
            value=age(figures.oldest_revocation),
        )
        yield GaugeMetricFamily(
            "broker_revocations_failed",
            "Backend revocation jobs given up (the credential may still work until it expires)",
            value=figures.revocations.get("failed", 0),
        )
        yield GaugeMetricFamily(
            "broker_approvals_pending",
            "Approval requests waiting for reviews",
            value=figures.approvals_pending,
        )
        yield GaugeMetricFamily(
            "broker_audit_log_size", "Events in the audit log", value=figures.log_size
        )
        if figures.checkpoint is not None:
            size, signed_at = figures.checkpoint
            yield GaugeMetricFamily(
                "broker_audit_checkpoint_age_seconds",
                "Time since the newest signed checkpoint was signed",
                value=age(signed_at),
            )
            yield GaugeMetricFamily(
                "broker_audit_checkpoint_size",
                "Tree size of the newest signed checkpoint (events it covers)",
                value=size,
            )
        if self._targets:
            lag = GaugeMetricFamily(
                "broker_audit_publish_lag_seconds",
                "Age of the oldest checkpoint not yet published to the target (0: none)",
                labels=["target"],
            )
            for target in self._targets:
                lag.add_metric([target], age(figures.publications.get(target, (0, None))[1]))
            yield lag


class _KeyMetrics(Collector):
    """The age of each (non-dev) issuer's cached key set, read from the cache at a scrape."""

    def __init__(self, jwks: JWKSCache, issuers: Sequence[IssuerConfig]) -> None:
        self._jwks = jwks
        self._issuers = tuple(issuers)

    def collect(self) -> Iterator[Metric]:
        ages = GaugeMetricFamily(
            "broker_jwks_age_seconds",
            "Time since the issuer's key set was last fetched (or its file found unchanged); "
            "absent until a token of the issuer needed it",
            labels=["issuer"],
        )
        bound = GaugeMetricFamily(
            "broker_jwks_max_age_seconds",
            "The issuer's max_key_age: older keys are refused",
            labels=["issuer"],
        )
        for issuer in self._issuers:
            bound.add_metric([issuer.name], issuer.max_key_age)
            seconds = self._jwks.age(issuer)
            if seconds is not None:
                ages.add_metric([issuer.name], seconds)
        yield ages
        yield bound
