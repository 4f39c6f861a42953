"""Publication: every signed checkpoint copied somewhere append-only, outside the broker's reach.

When the broker signs a checkpoint, the same transaction queues it for each configured target
(``checkpoint_publications``); the maintenance round publishes what is due, in size order, and
retries failures with backoff, across restarts. Exchanges never wait for it. Targets:

* :class:`S3Target` (``BROKER_AUDIT_PUBLISH_S3=s3://bucket/prefix``): one object per checkpoint,
  ``<prefix>/<tree size, 20 digits>``, written only if absent (``If-None-Match: *``), in a
  bucket with S3 Object Lock, so that not even the broker's own credentials can replace or
  delete it before its retention ends;
* :class:`WebhookTarget` (``BROKER_AUDIT_PUBLISH_URL``): ``POST`` of the signed note.

A checkpoint of the same size that is already published with other contents is a fork of the
log: reported CRITICAL, kept as ``conflict`` and never retried.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from broker.audit.integrity import Integrity
from broker.audit.log import SignedCheckpoint
from broker.errors import ConfigError
from broker.store.db import Store
from broker.store.tables import PublicationRow

log = logging.getLogger("broker.audit")
PUBLISHED = "published"
"""The integrity check a fork found by publication reports to."""
BATCH = 100
"""Checkpoints one round publishes per target at most."""
MAX_BACKOFF_S = 600
TIMEOUT_S = 10.0
NOTE_TYPE = "text/plain; charset=utf-8"


class PublishError(Exception):
    """A checkpoint could not be published now (the target is down, refused, timed out)."""


class ForkError(PublishError):
    """The target already holds another checkpoint of the same size: the log forked."""


class Target(Protocol):
    """An append-only place to publish signed checkpoints."""

    name: str
    """Stable name, stored with each queued publication (``s3``, ``webhook``)."""

    def describe(self) -> str:
        """Where it publishes, for status lines (no secrets: no query string, no userinfo)."""
        ...

    def publish(self, size: int, note: bytes) -> None:
        """Publish the signed note of the checkpoint of ``size``; publishing the same note
        again is a success. Raises PublishError (ForkError for another note of that size)."""
        ...

    def notice(self) -> str | None:
        """Something wrong with the target that does not stop publication, or None."""
        ...


def backoff(attempts: int) -> int:
    """Seconds before retry ``attempts`` + 1: 5, 10, 20, ... at most 10 minutes."""
    return int(min(5 * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S))


class S3Target:
    """Objects ``<prefix>/<size:020d>`` in an S3 bucket (meant to have Object Lock).

    ``retention_days`` sets a COMPLIANCE retention on each object; without it the bucket's
    default retention applies. boto3 is imported on first use (it costs ~0.3 s and ~30 MB)."""

    name = "s3"

    def __init__(self, url: str, *, retention_days: int | None = None) -> None:
        """Raises ConfigError when ``url`` is not ``s3://bucket[/prefix]``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                f"BROKER_AUDIT_PUBLISH_S3: expected s3://bucket[/prefix], got {url!r}"
            )
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.retention_days = retention_days
        self._client: Any = None
        self._guard = threading.Lock()
        self._lock_notice: str | None = None
        self._lock_checked = False

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, size: int) -> str:
        name = f"{size:020d}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _s3(self) -> Any:
        with self._guard:
            if self._client is None:
                import boto3  # noqa: PLC0415 (see the class docstring)
                from botocore.config import Config  # noqa: PLC0415

                config = Config(
                    retries={"total_max_attempts": 1},
                    connect_timeout=TIMEOUT_S,
                    read_timeout=TIMEOUT_S,
                )
                self._client = boto3.client("s3", config=config)
            return self._client

    def publish(self, size: int, note: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        key = self.key(size)
        put: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": note,
            "ContentType": NOTE_TYPE,
            # NOTE: never overwrite: a second version of a key would hide the first from a
            # reader who does not list versions.
            "IfNoneMatch": "*",
        }
        if self.retention_days is not None:
            put["ObjectLockMode"] = "COMPLIANCE"
            put["ObjectLockRetainUntilDate"] = dt.datetime.now(dt.UTC) + dt.timedelta(
                days=self.retention_days
            )
        try:
            self._s3().put_object(**put)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "error"))
            if code not in ("PreconditionFailed", "412"):
                raise PublishError(f"{self.describe()}: PutObject {key} failed: {code}") from None
            self._same_or_fork(key, note)
        except BotoCoreError as exc:
            raise PublishError(f"{self.describe()}: PutObject {key} failed: {exc}") from None
        self._check_lock()

    def _same_or_fork(self, key: str, note: bytes) -> None:
        """The key exists: the same note (published before a crash) is a success."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            there = self._s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise PublishError(f"{self.describe()}: GetObject {key} failed: {exc}") from None
        if there != note:
            raise ForkError(
                f"{self.describe()}/{key.rsplit('/', 1)[-1]} holds another checkpoint of the "
                "same size: the log forked (or its history was rewritten after it was published)"
            )

    def _check_lock(self) -> None:
        """Once per process: does the bucket have Object Lock? (a notice if not)."""
        if self._lock_checked:
            return
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            found = self._s3().get_object_lock_configuration(Bucket=self.bucket)
            enabled = found["ObjectLockConfiguration"].get("ObjectLockEnabled") == "Enabled"
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "error"))
            if code != "ObjectLockConfigurationNotFoundError":
                return  # may lack s3:GetBucketObjectLockConfiguration: try again next time
            enabled = False
        except BotoCoreError:
            return
        self._lock_checked = True
        if not enabled:
            self._lock_notice = (
                f"bucket {self.bucket} has no Object Lock: whoever holds the broker's AWS "
                "credentials can delete the published checkpoints"
            )
            log.warning("%s", self._lock_notice)

    def notice(self) -> str | None:
        return self._lock_notice


class WebhookTarget:
    """``POST`` of each signed note (``text/plain``) to a URL; any 2xx answer is success.
    Headers ``X-Broker-Audit-Size`` and ``X-Broker-Audit-Origin`` name the checkpoint."""

    name = "webhook"

    def __init__(self, url: str, *, timeout: float = TIMEOUT_S) -> None:
        """Raises ConfigError when ``url`` is not an http(s) URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("BROKER_AUDIT_PUBLISH_URL: expected an http(s) URL")
        self.url = url
        self._where = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        self._http = httpx.Client(timeout=timeout)

    def describe(self) -> str:
        return f"webhook {self._where}"

    def publish(self, size: int, note: bytes) -> None:
        headers = {
            "Content-Type": NOTE_TYPE,
            "X-Broker-Audit-Size": str(size),
            "X-Broker-Audit-Origin": note.split(b"\n", 1)[0].decode(),
        }
        try:
            resp = self._http.post(self.url, content=note, headers=headers)
        except httpx.HTTPError as exc:
            raise PublishError(f"{self.describe()}: {type(exc).__name__}") from None
        if not resp.is_success:
            raise PublishError(f"{self.describe()} answered {resp.status_code}")

    def notice(self) -> str | None:
        return None

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True)
class Backlog:
    """What waits for one target, as of the last round."""

    pending: int = 0
    oldest: int | None = None
    """The smallest tree size waiting."""
    last_error: str | None = None
    conflicts: int = 0


class Publisher:
    """Queues signed checkpoints for every target and publishes them from maintenance."""

    def __init__(
        self,
        store: Store,
        targets: Sequence[Target],
        *,
        integrity: Integrity,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.store = store
        self.targets = {t.name: t for t in targets}
        self.integrity = integrity
        self.clock = clock
        self.failures = dict.fromkeys(self.targets, 0)
        """Failed attempts per target since start (a Prometheus counter reads it)."""
        self.backlog = {name: Backlog() for name in self.targets}
        self._errors: dict[str, str] = {}

    def enqueue(self, session: Session, signed: SignedCheckpoint) -> None:
        """Queue ``signed`` for every target, in the transaction that stored it (a hook of
        :attr:`broker.audit.log.AuditLog.on_signed`)."""
        for name in self.targets:
            session.add(
                PublicationRow(
                    target=name,
                    size=signed.size,
                    note=signed.note,
                    status="pending",
                    attempts=0,
                    next_attempt_at=signed.signed_at,
                    created_at=signed.signed_at,
                )
            )

    def process(self) -> int:
        """Publish what is due, per target in size order, stopping a target at its first
        failure (the rest waits for its retry). Returns how many were published. Raises
        AuditUnavailable when the store fails; a target's failure is recorded, never raised."""
        published = 0
        for name, target in self.targets.items():
            now = self.clock()
            with self.store.read() as session:
                due = session.execute(
                    select(PublicationRow.size, PublicationRow.note)
                    .where(
                        PublicationRow.target == name,
                        PublicationRow.status == "pending",
                        PublicationRow.next_attempt_at <= now,
                    )
                    .order_by(PublicationRow.size)
                    .limit(BATCH)
                ).all()
            for size, note in due:
                if not self._attempt(target, size, note):
                    break
                published += 1
        self.refresh()
        return published

    def _attempt(self, target: Target, size: int, note: str) -> bool:
        try:
            target.publish(size, note.encode())
        except ForkError as exc:
            self._record_failure(target, size, str(exc), status="conflict")
            self.integrity.report(PUBLISHED, str(exc))
            return False
        except PublishError as exc:
            self._record_failure(target, size, str(exc), status="pending")
            return False
        except Exception as exc:  # a bug in a target must not stop maintenance
            log.exception("publishing checkpoint %d to %s raised", size, target.describe())
            self._record_failure(target, size, type(exc).__name__, status="pending")
            return False
        with self.store.write() as session:
            session.execute(
                delete(PublicationRow).where(
                    PublicationRow.target == target.name, PublicationRow.size == size
                )
            )
        self._errors.pop(target.name, None)
        return True

    def _record_failure(self, target: Target, size: int, error: str, *, status: str) -> None:
        self.failures[target.name] += 1
        self._errors[target.name] = error
        now = self.clock()
        with self.store.write() as session:
            row = session.get(PublicationRow, (target.name, size), with_for_update=True)
            if row is None:
                return
            row.attempts += 1
            row.status = status
            row.last_error = error
            row.next_attempt_at = now + dt.timedelta(seconds=backoff(row.attempts))
        log.warning(
            "checkpoint %d not published to %s (attempt %d): %s",
            size,
            target.describe(),
            row.attempts,
            error,
        )

    def refresh(self) -> None:
        """Read the backlog of every target (one grouped query) for :meth:`notices` and the
        metrics; a ``conflict`` row found (after a restart, say) is reported again."""
        with self.store.read() as session:
            rows = session.execute(
                select(
                    PublicationRow.target,
                    PublicationRow.status,
                    func.count(),
                    func.min(PublicationRow.size),
                ).group_by(PublicationRow.target, PublicationRow.status)
            ).all()
        counts: dict[tuple[str, str], tuple[int, int]] = {
            (name, status): (int(count), int(oldest)) for name, status, count, oldest in rows
        }
        for name in self.targets:
            pending, oldest = counts.get((name, "pending"), (0, 0))
            conflicts, _ = counts.get((name, "conflict"), (0, 0))
            self.backlog[name] = Backlog(
                pending, oldest if pending else None, self._errors.get(name), conflicts
            )
            if conflicts and self.integrity.problem(PUBLISHED) is None:
                self.integrity.report(
                    PUBLISHED,
                    f"{self.targets[name].describe()} holds another checkpoint of a "
                    "size the broker signed: the log forked (see checkpoint_publications)",
                )

    def notices(self) -> dict[str, str]:
        """What is wrong with publication, per target, as of the last round (for /readyz,
        which does not fail for it)."""
        notes = {}
        for name, target in self.targets.items():
            backlog = self.backlog[name]
            said = []
            if backlog.pending:
                said.append(
                    f"{backlog.pending} checkpoint(s) waiting (the oldest of size "
                    f"{backlog.oldest})" + (f": {backlog.last_error}" if backlog.last_error else "")
                )
            if backlog.conflicts:
                said.append(f"{backlog.conflicts} checkpoint(s) conflict with what is published")
            notice = target.notice()
            if notice:
                said.append(notice)
            if said:
                notes[f"audit_publication_{name}"] = f"{target.describe()}: " + "; ".join(said)
        return notes

    def close(self) -> None:
        for target in self.targets.values():
            close = getattr(target, "close", None)
            if close is not None:
                close()


def targets_from_settings(
    s3: str | None, retention_days: int | None, url: str | None
) -> list[Target]:
    """The targets the settings name. Raises ConfigError for a malformed one."""
    targets: list[Target] = []
    if s3:
        targets.append(S3Target(s3, retention_days=retention_days))
    if url:
        targets.append(WebhookTarget(url))
    return targets
