"""The ``aws`` backend: AWS STS credentials for one model and one action.

Each grant becomes one ``sts:AssumeRole`` into the model's role (``models.<m>.backends.aws``):

- ``RoleSessionName`` is the grant id and ``DurationSeconds`` the grant's TTL;
- an inline session ``Policy`` narrows the role to the model's S3 prefix and to the S3
  operations the action maps to (:data:`DEFAULT_ACTION_ACCESS`);
- session ``Tags`` ``grant_id``, ``model``, ``action``, ``tier`` (all transitive), and
  ``SourceIdentity`` = the workload's subject (:func:`source_identity`), so CloudTrail names
  the workload and the grant behind every call.

STS credentials cannot be deleted, so revocation writes ``Deny`` statements into the role's
inline policy ``broker-revocations`` (:class:`RevocationPolicy`): one keyed on the session tag
``aws:PrincipalTag/grant_id`` per revoked grant, and one ``aws:TokenIssueTime`` cutoff for
bulk revocation and for when the per-grant list would not fit IAM's size limit.

The broker's own AWS access comes from boto3's default credential chain (environment, web
identity, instance role...); ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` are honoured. See
``docs/backends/aws.md``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

# NOTE: only the exceptions at import time (~10 ms): boto3 and its clients cost ~0.3 s and ~30 MB
# and are made on first use, so a broker whose policy merely mentions aws does not pay for them.
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

if TYPE_CHECKING:
    import boto3

from broker.backends.base import TOKEN_TYPE_AWS, CachedProbe, Credential
from broker.errors import (
    AccessDenied,
    BackendUnavailable,
    BrokerError,
    ConfigError,
    InvalidRequest,
)
from broker.grants.model import Grant, GrantStatus
from broker.policy import LoadedPolicy
from broker.policy.model import AwsBackendConfig

log = logging.getLogger("broker.backends.aws")

Clock = Callable[[], dt.datetime]
RoleLock = Callable[[str], AbstractContextManager[object]]

# --- AWS limits (IAM and STS quotas; docs/backends/aws.md cites them) ---------------------------
MIN_SESSION_SECONDS = 900
"""AssumeRole's ``DurationSeconds`` floor: a grant shorter than this cannot use STS."""
MAX_SESSION_SECONDS = 43200
"""AssumeRole's ceiling (a role's ``MaxSessionDuration`` can be at most 12 h)."""
ROLE_CHAINING_MAX_SECONDS = 3600
"""STS caps a session at 1 h when the caller's own credentials are a role session."""
SESSION_POLICY_MAX_CHARS = 2048
ROLE_INLINE_POLICIES_MAX_CHARS = 10240
"""All inline policies of one role together, whitespace not counted."""
SOURCE_IDENTITY_MAX_CHARS = 64
TAG_VALUE_MAX_CHARS = 256

REVOCATION_POLICY_NAME = "broker-revocations"
SESSION_TAG_KEYS = ("grant_id", "model", "action", "tier")
GRANT_TAG_CONDITION_KEY = "aws:PrincipalTag/grant_id"
ISSUE_TIME_CONDITION_KEY = "aws:TokenIssueTime"

EXPIRY_MARGIN = dt.timedelta(minutes=5)
"""How long after a grant's expiry its revocation entry stays: STS starts the session clock
when it answers, a little after the broker stamped ``issued_at``, and clocks drift."""
BUCKET_SECONDS = 900
"""Revoked grant ids are grouped by expiry into 15-minute buckets: one statement each."""
CUTOFF_SKEW = dt.timedelta(seconds=5)
"""The fallback cutoff sits this far past the broker's clock, so that a session STS stamped
with a slightly faster clock is still before it (fail closed: sessions issued in these few
seconds are revoked too)."""

HEALTH_TIMEOUT_S = 2
"""Connect and read timeouts of the readiness probe's STS call (one attempt, no retries)."""

TOKEN_TYPE_NOT_APPLICABLE = "N_A"  # noqa: S105 (RFC 8693 §2.2.1: not an OAuth access token)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SOURCE_IDENTITY_CHARS = re.compile(r"[^A-Za-z0-9_+=,.@-]")
_TAG_VALUE = re.compile(r"^[\w .:/=+\-@]*$")
_CONNECTION_TROUBLE = {
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "RequestTimeout",
}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(at: dt.datetime) -> str:
    """``2024-05-01T12:00:00Z``: the form IAM conditions and credential_process expect."""
    return at.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _compact(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=False)


def policy_chars(document: Mapping[str, Any]) -> int:
    """A policy's size as IAM counts it against its quotas: characters, whitespace excluded."""
    return len(re.sub(r"\s", "", _compact(document)))


# --- pure pieces: TTL check, names, the session policy -----------------------------------------


def check_action_ttl(action_max_ttl: int) -> str | None:
    """A warning for ``broker policy check`` when an action's ``max_ttl`` (seconds) does not
    suit AWS STS, else None.

    Below 15 minutes the action cannot use this backend at all (STS refuses sessions shorter
    than 900 s). Above 1 hour STS issues the session only if the model role's
    ``MaxSessionDuration`` allows it *and* the broker's own credentials are not a role session
    (role chaining caps every session at 1 h); otherwise callers must ask for a shorter
    ``requested_ttl``.
    """
    if action_max_ttl < MIN_SESSION_SECONDS:
        return (
            f"max_ttl {action_max_ttl}s is below AWS STS's minimum session of "
            f"{MIN_SESSION_SECONDS}s: this action cannot get aws credentials "
            "(raise max_ttl to 15m or more, or drop aws from its rules)"
        )
    if action_max_ttl > MAX_SESSION_SECONDS:
        return (
            f"max_ttl {action_max_ttl}s exceeds AWS STS's maximum session of "
            f"{MAX_SESSION_SECONDS}s: aws credentials need requested_ttl <= {MAX_SESSION_SECONDS}"
        )
    if action_max_ttl > ROLE_CHAINING_MAX_SECONDS:
        return (
            f"max_ttl {action_max_ttl}s is over 1h: STS issues such sessions only if the model "
            "role's MaxSessionDuration is at least that long and the broker's own AWS "
            "credentials are not a role session (role chaining caps sessions at "
            f"{ROLE_CHAINING_MAX_SECONDS}s); otherwise callers need requested_ttl <= "
            f"{ROLE_CHAINING_MAX_SECONDS}"
        )
    return None


def source_identity(subject: str) -> str:
    """The workload subject in STS's ``SourceIdentity`` form: ``[A-Za-z0-9_+=,.@-]``, 2 to 64
    characters.

    A subject that already fits is used as it is. Otherwise every other character becomes
    ``_``, and the result is cut to 51 characters and followed by ``.`` and the first 12 hex
    digits of the SHA-256 of the full subject, so that distinct subjects stay distinct and the
    grant's audit entry (which has the full subject) can be matched with CloudTrail.
    """
    if 2 <= len(subject) <= SOURCE_IDENTITY_MAX_CHARS and not _SOURCE_IDENTITY_CHARS.search(
        subject
    ):
        return subject
    digest = hashlib.sha256(subject.encode("utf-8")).hexdigest()[:12]
    keep = SOURCE_IDENTITY_MAX_CHARS - len(digest) - 1
    return f"{_SOURCE_IDENTITY_CHARS.sub('_', subject)[:keep]}.{digest}"


@dataclass(frozen=True, slots=True)
class S3Access:
    """What an action may do under a model's S3 prefix. Entries are key prefixes relative to
    the model's ``s3_prefix`` (``""``: all of it; ``"checkpoints/"``: that folder)."""

    read: tuple[str, ...] = ("",)
    """``s3:GetObject`` on objects, ``s3:ListBucket`` limited to these prefixes."""
    write: tuple[str, ...] = ()
    """``s3:PutObject`` and ``s3:AbortMultipartUpload`` (large checkpoints upload in parts)."""


READ_ONLY = S3Access()
DEFAULT_ACTION_ACCESS: Mapping[str, S3Access] = {
    "evaluate": READ_ONLY,
    "fine-tune": S3Access(write=("checkpoints/",)),
}
"""Actions not listed here read only."""


@dataclass(frozen=True, slots=True)
class S3Location:
    partition: str
    bucket: str
    key_prefix: str

    @classmethod
    def of(cls, config: AwsBackendConfig) -> S3Location:
        """The bucket and key prefix of ``config.s3_prefix``. ConfigError unless the prefix is
        a folder (ends with ``/``, or is the whole bucket) without IAM wildcards or variables."""
        bucket, _, key_prefix = config.s3_prefix.removeprefix("s3://").partition("/")
        # NOTE: IAM reads * ? and ${...} in a Resource as wildcards and variables, and a
        # prefix without a trailing slash ("llama-7b") also matches "llama-7b-other/...".
        if re.search(r"[*?$]", key_prefix):
            raise ConfigError(f"aws s3_prefix {config.s3_prefix!r}: * ? and $ are not allowed")
        if key_prefix and not key_prefix.endswith("/"):
            raise ConfigError(
                f"aws s3_prefix {config.s3_prefix!r}: must end with '/' (a folder); as written "
                "it would also match every key that merely starts with the same characters"
            )
        partition = config.role_arn.split(":")[1]
        return cls(partition=partition, bucket=bucket, key_prefix=key_prefix)


def session_policy(config: AwsBackendConfig, access: S3Access) -> dict[str, Any]:
    """The inline session policy for one grant: S3 only, under the model's prefix, and only
    the operations of ``access``. AWS intersects it with the role's own policies."""
    where = S3Location.of(config)
    arn = f"arn:{where.partition}:s3:::{where.bucket}"
    statements: list[dict[str, Any]] = []
    if access.read:
        prefixes = [where.key_prefix + p for p in access.read]
        statements.append(
            {
                "Sid": "ReadModelObjects",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"{arn}/{p}*" for p in prefixes],
            }
        )
        listing: dict[str, Any] = {
            "Sid": "ListModelPrefix",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [arn],
        }
        if any(prefixes):
            listing["Condition"] = {
                "StringLike": {"s3:prefix": [v for p in prefixes for v in (p, f"{p}*")]}
            }
        statements.append(listing)
    if access.write:
        statements.append(
            {
                "Sid": "WriteModelObjects",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": [f"{arn}/{where.key_prefix}{p}*" for p in access.write],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def session_tags(grant: Grant) -> list[dict[str, str]]:
    """The session tags of ``grant``'s AWS session, in :data:`SESSION_TAG_KEYS` order."""
    values = (grant.id, grant.model, grant.action, grant.tier)
    return [{"Key": k, "Value": v} for k, v in zip(SESSION_TAG_KEYS, values, strict=True)]


def _check_tag_value(what: str, value: str) -> None:
    if len(value) > TAG_VALUE_MAX_CHARS or not _TAG_VALUE.match(value):
        raise ConfigError(
            f"aws: {what} {value!r} cannot be an AWS session tag value (at most "
            f"{TAG_VALUE_MAX_CHARS} letters, digits, spaces and _ . : / = + - @)"
        )


def role_name(role_arn: str) -> str:
    """``arn:aws:iam::123456789012:role/path/name`` → ``name``."""
    return role_arn.rsplit("/", 1)[-1]


# --- credential_process -------------------------------------------------------------------------


def credential_process_json(credential: Credential | Mapping[str, Any]) -> str:
    """The JSON an AWS SDK reads from a ``credential_process`` command (Version 1).

    ``credential`` is an aws :class:`Credential`, or the body of a ``POST /v1/token`` answer
    for ``urn:broker:token-type:aws-credentials`` (which carries ``aws_credentials``).

    Raises:
        ValueError: it holds no complete ``aws_credentials``.
    """
    source = credential.extra if isinstance(credential, Credential) else credential
    creds = source.get("aws_credentials")
    names = ("access_key_id", "secret_access_key", "session_token", "expiration")
    if not isinstance(creds, Mapping) or not all(isinstance(creds.get(n), str) for n in names):
        raise ValueError(
            "no AWS credentials here: expected aws_credentials with "
            + ", ".join(names)
            + " (was the token requested as urn:broker:token-type:aws-credentials?)"
        )
    return json.dumps(
        {
            "Version": 1,
            "AccessKeyId": creds["access_key_id"],
            "SecretAccessKey": creds["secret_access_key"],
            "SessionToken": creds["session_token"],
            "Expiration": creds["expiration"],
        }
    )


# --- the revocation policy (pure) ---------------------------------------------------------------

_GRANTS_SID = re.compile(r"^BrokerRevokedGrantsUntil(\d+)$")
_CUTOFF_SID = re.compile(r"^BrokerRevokedIssuedBeforeUntil(\d+)$")


def _deny(sid: str, condition: dict[str, Any]) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Deny", "Action": "*", "Resource": "*", "Condition": condition}


@dataclass
class RevocationPolicy:
    """The role's ``broker-revocations`` inline policy as data.

    - ``grants``: revoked grant ids by the time (epoch seconds) after which their sessions have
      surely expired; each bucket is one Deny on ``aws:PrincipalTag/grant_id``.
    - ``cutoff``: sessions issued before it are denied (``aws:TokenIssueTime``); the epoch
      means none. It can go once ``cutoff_until`` has passed.
    - ``foreign``: statements the broker did not write; kept as they are.

    The cutoff statement is always present (at the epoch it matches nothing), so the policy is
    never empty; Terraform creates exactly :meth:`empty`.
    """

    grants: dict[int, set[str]] = field(default_factory=dict)
    cutoff: dt.datetime = _EPOCH
    cutoff_until: int = 0
    foreign: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def empty(cls) -> RevocationPolicy:
        return cls()

    @classmethod
    def parse(cls, document: Mapping[str, Any] | str | None) -> RevocationPolicy:
        """Read a policy this class wrote (or None: no policy yet). Statements it did not
        write are kept in ``foreign``. Raises ValueError for a document that is no policy."""
        if document is None:
            return cls.empty()
        doc = json.loads(document) if isinstance(document, str) else document
        statements = doc.get("Statement", [])
        policy = cls.empty()
        for statement in [statements] if isinstance(statements, dict) else statements:
            if not policy._absorb(statement):
                policy.foreign.append(statement)
        return policy

    def _absorb(self, statement: object) -> bool:
        if not isinstance(statement, Mapping) or statement.get("Effect") != "Deny":
            return False
        sid = str(statement.get("Sid", ""))
        condition = statement.get("Condition")
        if not isinstance(condition, Mapping):
            return False
        if (m := _GRANTS_SID.match(sid)) and (
            ids := condition.get("StringEquals", {}).get(GRANT_TAG_CONDITION_KEY)
        ):
            bucket = self.grants.setdefault(int(m.group(1)), set())
            bucket.update([ids] if isinstance(ids, str) else ids)
            return True
        if (m := _CUTOFF_SID.match(sid)) and (
            at := condition.get("DateLessThan", {}).get(ISSUE_TIME_CONDITION_KEY)
        ):
            cutoff = _parse_iam_date(str(at))
            if cutoff >= self.cutoff:
                self.cutoff, self.cutoff_until = cutoff, int(m.group(1))
            return True
        return False

    def to_document(self) -> dict[str, Any]:
        statements = [
            _deny(
                f"BrokerRevokedIssuedBeforeUntil{self.cutoff_until}",
                {"DateLessThan": {ISSUE_TIME_CONDITION_KEY: _iso(self.cutoff)}},
            )
        ]
        for until in sorted(self.grants):
            ids = sorted(self.grants[until])
            statements.append(
                _deny(
                    f"BrokerRevokedGrantsUntil{until}",
                    {"StringEquals": {GRANT_TAG_CONDITION_KEY: ids}},
                )
            )
        return {"Version": "2012-10-17", "Statement": statements + self.foreign}

    def chars(self) -> int:
        return policy_chars(self.to_document())

    def revoked_grant_ids(self) -> set[str]:
        return {g for ids in self.grants.values() for g in ids}

    def add_grant(self, grant_id: str, expires_at: dt.datetime) -> None:
        """Deny ``grant_id``'s sessions until a while after ``expires_at``."""
        if grant_id in self.revoked_grant_ids():
            return
        until = math.ceil((expires_at + EXPIRY_MARGIN).timestamp() / BUCKET_SECONDS)
        self.grants.setdefault(until * BUCKET_SECONDS, set()).add(grant_id)

    def revoke_issued_before(self, cutoff: dt.datetime, now: dt.datetime) -> None:
        """Deny every session issued before ``cutoff`` (a later cutoff covers an earlier one).

        When ``cutoff`` is not in the past every listed grant is covered by it (each was
        revoked, so issued, before now), so the per-grant entries are dropped.
        """
        # IAM compares whole seconds: round up, so that no session of the last second escapes.
        cutoff = cutoff.astimezone(dt.UTC)
        if cutoff.microsecond:
            cutoff = cutoff.replace(microsecond=0) + dt.timedelta(seconds=1)
        until = int((cutoff + dt.timedelta(seconds=MAX_SESSION_SECONDS)).timestamp())
        self.cutoff = max(self.cutoff, cutoff)
        self.cutoff_until = max(self.cutoff_until, until)
        if cutoff >= now:
            self.grants.clear()

    def prune(self, now: dt.datetime) -> int:
        """Drop entries whose sessions have all expired; how many grant ids (and cutoff) went."""
        stamp = now.timestamp()
        gone = [until for until in self.grants if until <= stamp]
        removed = sum(len(self.grants.pop(until)) for until in gone)
        if self.cutoff != _EPOCH and self.cutoff_until <= stamp:
            self.cutoff, self.cutoff_until = _EPOCH, 0
            removed += 1
        return removed


# --- revocation outcomes --------------------------------------------------------------------------


class RevocationMethod(StrEnum):
    GRANT_TAG = "grant_tag"
    """A Deny on the session tag ``grant_id``: only this grant's sessions."""
    ISSUE_TIME_CUTOFF = "issue_time_cutoff"
    """A Deny on ``aws:TokenIssueTime``: every session of the role issued before ``cutoff``."""
    ALREADY_EXPIRED = "already_expired"
    """The grant's sessions had expired: nothing to write."""


@dataclass(frozen=True, slots=True)
class AwsRevocation:
    """What a revocation wrote into a role's ``broker-revocations`` policy.

    ``fallback`` is true when a single grant's revocation had to become a time cutoff because
    the per-grant list would not fit IAM's inline-policy limit: every session of the role
    issued before ``cutoff`` (other grants' too) stops working. Record it in the audit log.
    """

    model: str
    role_arn: str
    method: RevocationMethod
    grant_ids: tuple[str, ...] = ()
    cutoff: dt.datetime | None = None
    policy_chars: int = 0
    budget_chars: int = ROLE_INLINE_POLICIES_MAX_CHARS
    pruned: int = 0

    @property
    def fallback(self) -> bool:
        return bool(self.grant_ids) and self.method is RevocationMethod.ISSUE_TIME_CUTOFF

    def to_event(self) -> dict[str, Any]:
        """The outcome as JSON for an audit event (no secrets in it)."""
        return {
            "model": self.model,
            "role_arn": self.role_arn,
            "method": str(self.method),
            "grant_ids": list(self.grant_ids),
            "cutoff": _iso(self.cutoff) if self.cutoff else None,
            "fallback": self.fallback,
            "policy_chars": self.policy_chars,
            "budget_chars": self.budget_chars,
            "pruned": self.pruned,
        }


@dataclass(frozen=True, slots=True)
class _Written:
    policy: RevocationPolicy
    fell_back: bool
    chars: int
    budget: int
    pruned: int


# --- the backend ----------------------------------------------------------------------------------


class AwsBackend:
    """Issues STS credentials per grant and revokes them through the role's inline policy."""

    name = "aws"
    token_type = TOKEN_TYPE_AWS
    external = True  # an STS session exists at AWS from the moment AssumeRole answers

    def __init__(
        self,
        policy: LoadedPolicy,
        *,
        session: boto3.Session | None = None,
        clock: Clock = _utcnow,
        action_access: Mapping[str, S3Access] | None = None,
        role_lock: RoleLock | None = None,
    ) -> None:
        """``session`` defaults to ``boto3.Session()`` (the default credential chain; never
        keys from the policy file). ``action_access`` replaces :data:`DEFAULT_ACTION_ACCESS`.
        ``role_lock(role_arn)`` serialises read-modify-writes of one role's revocation policy;
        the default is a lock in this process (give a database lock when several brokers
        share the roles).

        Raises:
            ConfigError: a model's aws settings, or a model or action name, cannot be used.
        """
        self._policy = policy.policy
        self._clock = clock
        self._access = dict(DEFAULT_ACTION_ACCESS if action_access is None else action_access)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._role_lock = role_lock or self._process_lock
        for model, config in self._aws_models().items():
            S3Location.of(config)
            _check_tag_value("model name", model)
        for action in self._policy.actions:
            _check_tag_value("action name", action)
        self._session = session
        self._clients: tuple[Any, Any] | None = None
        self._health_sts: Any = None
        self._clients_guard = threading.Lock()
        self._health = CachedProbe(self._probe_sts)

    def _connect(self) -> tuple[Any, Any]:
        """The STS and IAM clients, made on first use from the session (default chain)."""
        with self._clients_guard:
            if self._clients is None:
                import boto3  # noqa: PLC0415 (see the note at the imports)
                from botocore.config import Config  # noqa: PLC0415

                session = self._session or boto3.Session()
                config = Config(
                    retries={"mode": "standard"},
                    connect_timeout=5,
                    read_timeout=15,
                    region_name=_region(session),
                )
                self._clients = (
                    session.client("sts", config=config),
                    session.client("iam", config=config),
                )
            return self._clients

    def ready(self) -> str | None:
        """None when STS answers ``GetCallerIdentity`` with the broker's own credentials (so
        they resolve and are valid); else what failed. Cached
        (:class:`~broker.backends.base.CachedProbe`); one attempt of at most
        :data:`HEALTH_TIMEOUT_S` to connect and to read. Never raises."""
        return self._health()

    def _probe_sts(self) -> str | None:
        try:
            self._health_client().get_caller_identity()
        except ClientError as exc:
            code, _ = _error_code(exc)
            return f"aws: STS GetCallerIdentity failed: {code}"
        except BotoCoreError as exc:
            return f"aws: STS GetCallerIdentity failed: {type(exc).__name__}: {exc}"
        return None

    def _health_client(self) -> Any:
        with self._clients_guard:
            if self._health_sts is None:
                import boto3  # noqa: PLC0415 (see the note at the imports)
                from botocore.config import Config  # noqa: PLC0415

                session = self._session or boto3.Session()
                config = Config(
                    retries={"total_max_attempts": 1},
                    connect_timeout=HEALTH_TIMEOUT_S,
                    read_timeout=HEALTH_TIMEOUT_S,
                    region_name=_region(session),
                )
                self._health_sts = session.client("sts", config=config)
            return self._health_sts

    @property
    def _sts(self) -> Any:
        return self._connect()[0]

    @property
    def _iam(self) -> Any:
        return self._connect()[1]

    # --- issue ----------------------------------------------------------------------------------

    def issue(self, grant: Grant) -> Credential:
        """AssumeRole into the model's role for ``grant``.

        Raises:
            InvalidRequest: the model has no aws settings, or the grant's TTL is outside what
                STS allows (15 min to 12 h, or the role's own maximum).
            AccessDenied: STS refused (its error code is in the description).
            BackendUnavailable: STS could not be reached or failed.
        """
        config = self._config_for(grant.model)
        ttl = int((grant.expires_at - grant.issued_at).total_seconds())
        if ttl < MIN_SESSION_SECONDS:
            raise InvalidRequest(
                f"aws: the grant's TTL is {ttl}s but AWS STS issues sessions of at least "
                f"{MIN_SESSION_SECONDS}s; action {grant.action} cannot use the aws backend "
                "unless its max_ttl (and any requested_ttl) is 15 minutes or more"
            )
        if ttl > MAX_SESSION_SECONDS:
            raise InvalidRequest(
                f"aws: the grant's TTL is {ttl}s but AWS STS issues sessions of at most "
                f"{MAX_SESSION_SECONDS}s; ask for requested_ttl <= {MAX_SESSION_SECONDS}"
            )
        params = self.assume_role_params(grant, config, ttl)
        try:
            answer = self._sts.assume_role(**params)
            creds = answer["Credentials"]
            aws_credentials = {
                "access_key_id": str(creds["AccessKeyId"]),
                "secret_access_key": str(creds["SecretAccessKey"]),
                "session_token": str(creds["SessionToken"]),
                "expiration": _iso(creds["Expiration"]),
            }
        except ClientError as exc:
            raise self._sts_error(exc, grant.model, ttl) from None
        except (BotoCoreError, KeyError, TypeError, AttributeError) as exc:
            raise _unavailable("STS AssumeRole", exc) from None
        return Credential(
            # NOTE: the session token is the one piece that names this STS session; the three
            # parts an SDK needs are in aws_credentials (docs/backends/aws.md).
            access_token=aws_credentials["session_token"],
            issued_token_type=TOKEN_TYPE_AWS,
            token_type=TOKEN_TYPE_NOT_APPLICABLE,
            expires_at=grant.expires_at,
            credential_ref=grant.id,
            extra={"aws_credentials": aws_credentials},
        )

    def assume_role_params(
        self, grant: Grant, config: AwsBackendConfig, ttl: int
    ) -> dict[str, Any]:
        """The exact AssumeRole parameters for ``grant`` (no secrets in them)."""
        access = self._access.get(grant.action, READ_ONLY)
        policy = _compact(session_policy(config, access))
        if len(policy) > SESSION_POLICY_MAX_CHARS:
            raise InvalidRequest(
                f"aws: the session policy for {grant.action} on {grant.model} has "
                f"{len(policy)} characters; STS allows {SESSION_POLICY_MAX_CHARS}"
            )
        return {
            "RoleArn": config.role_arn,
            "RoleSessionName": grant.id,
            "DurationSeconds": ttl,
            "Policy": policy,
            "Tags": session_tags(grant),
            # NOTE: transitive, so a session chained from this one keeps (and cannot change)
            # the grant's tags, and the revocation Deny still finds it.
            "TransitiveTagKeys": list(SESSION_TAG_KEYS),
            "SourceIdentity": source_identity(grant.subject),
        }

    def _sts_error(self, exc: ClientError, model: str, ttl: int) -> BrokerError:
        code, message = _error_code(exc)
        # The full AWS message names the broker's own principal: log it, do not return it.
        log.warning("aws: STS AssumeRole for model %s failed: %s: %s", model, code, message)
        if code in {"AccessDenied", "AccessDeniedException"}:
            return AccessDenied(
                f"aws: STS refused AssumeRole into the role of model {model}: {code} (the "
                "broker may not assume, tag or set the source identity on that role)",
                aws_error=code,
            )
        if code == "ValidationError" and "DurationSeconds" in message:
            return InvalidRequest(
                f"aws: STS refused a {ttl}s session for model {model}: {code}: the role's "
                "MaxSessionDuration (or role chaining's 1h cap) is shorter; ask for a shorter "
                "requested_ttl",
                aws_error=code,
            )
        return BackendUnavailable(
            f"aws: STS AssumeRole for model {model} failed: {code}", aws_error=code
        )

    # --- revoke ---------------------------------------------------------------------------------

    def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
        """Deny the grant's sessions in its role's ``broker-revocations`` policy; True once IAM
        accepted the policy (``credential_ref`` is the grant id, the session tag). See
        :meth:`revoke_grants`, which also returns what was written, and its errors."""
        return self.revoke_explained(grant, credential_ref)[0]

    def revoke_explained(
        self, grant: Grant, credential_ref: str | None
    ) -> tuple[bool, dict[str, Any]]:
        """:meth:`revoke`, and what was written (for the audit event; ``fallback`` when the
        whole role got a time cutoff)."""
        (outcome,) = self.revoke_grants([grant])
        if outcome.fallback:
            log.warning("aws: revocation fell back to a time cutoff: %s", outcome.to_event())
        return True, outcome.to_event()

    def revoke_grants(self, grants: Sequence[Grant]) -> list[AwsRevocation]:
        """Revoke each grant's AWS sessions: one policy write, and one outcome, per role (plus
        an ``ALREADY_EXPIRED`` outcome per grant that expired rather than was revoked, or whose
        sessions have ended: those need no entry). Idempotent, so it can also re-apply the
        broker's list of revoked, unexpired grants after a lost update.

        When the entries would not fit the role's inline-policy budget, they all become one
        ``aws:TokenIssueTime`` cutoff (the outcome's ``fallback``: record it).

        Raises:
            InvalidRequest: a grant's model has no aws settings.
            BackendUnavailable: IAM could not be reached or refused the write.
        """
        now = self._clock()
        outcomes: list[AwsRevocation] = []
        by_role: dict[str, list[Grant]] = {}
        for grant in grants:
            config = self._config_for(grant.model)
            # NOTE: a session lives exactly its grant's TTL, so a grant that simply expired
            # needs no Deny; writing one for every expiry would fill the role's policy and
            # force cutoffs that revoke everyone.
            if grant.status is GrantStatus.EXPIRED or grant.expires_at + EXPIRY_MARGIN <= now:
                outcomes.append(
                    AwsRevocation(
                        model=grant.model,
                        role_arn=config.role_arn,
                        method=RevocationMethod.ALREADY_EXPIRED,
                        grant_ids=(grant.id,),
                    )
                )
            else:
                by_role.setdefault(config.role_arn, []).append(grant)
        for role_arn, role_grants in by_role.items():
            outcomes.append(self._revoke_in_role(role_arn, role_grants, now))
        return outcomes

    def _revoke_in_role(
        self, role_arn: str, grants: list[Grant], now: dt.datetime
    ) -> AwsRevocation:
        def add(policy: RevocationPolicy) -> None:
            for grant in grants:
                policy.add_grant(grant.id, grant.expires_at)

        def collapse(policy: RevocationPolicy) -> None:
            policy.revoke_issued_before(now + CUTOFF_SKEW, now)

        written = self._update(role_arn, now, add, collapse)
        return AwsRevocation(
            model=grants[0].model,
            role_arn=role_arn,
            method=RevocationMethod.ISSUE_TIME_CUTOFF
            if written.fell_back
            else RevocationMethod.GRANT_TAG,
            grant_ids=tuple(g.id for g in grants),
            cutoff=written.policy.cutoff if written.fell_back else None,
            policy_chars=written.chars,
            budget_chars=written.budget,
            pruned=written.pruned,
        )

    def revoke_all_before(self, model: str, cutoff: dt.datetime) -> AwsRevocation:
        """Deny every session of ``model``'s role issued before ``cutoff`` (bulk revocation).

        NOTE: it acts on the role, so models sharing one role are revoked together; and it
        compares with the time STS stamped on each session, so pass a cutoff a few seconds
        after the newest session meant to be revoked.

        Raises:
            InvalidRequest: the model has no aws settings.
            BackendUnavailable: IAM could not be reached or refused the write.
        """
        config = self._config_for(model)
        now = self._clock()

        def cut(policy: RevocationPolicy) -> None:
            policy.revoke_issued_before(cutoff, now)

        written = self._update(config.role_arn, now, cut, cut)
        return AwsRevocation(
            model=model,
            role_arn=config.role_arn,
            method=RevocationMethod.ISSUE_TIME_CUTOFF,
            cutoff=written.policy.cutoff,
            policy_chars=written.chars,
            budget_chars=written.budget,
            pruned=written.pruned,
        )

    def prune(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Drop revocation entries whose sessions have expired, in every aws model's role;
        the number dropped per role ARN (roles with nothing to drop are not written).

        Raises:
            BackendUnavailable: IAM could not be reached or refused the write.
        """
        at = now or self._clock()
        roles = sorted({c.role_arn for c in self._aws_models().values()})
        return {
            arn: self._update(arn, at, lambda _p: None, lambda _p: None).pruned for arn in roles
        }

    def revocation_policy(self, model: str) -> RevocationPolicy:
        """The current ``broker-revocations`` policy of ``model``'s role, as read from IAM."""
        document = self._read_policy(role_name(self._config_for(model).role_arn))
        return RevocationPolicy.parse(document)

    # --- the read-modify-write --------------------------------------------------------------

    def _update(
        self,
        role_arn: str,
        now: dt.datetime,
        change: Callable[[RevocationPolicy], None],
        overflow: Callable[[RevocationPolicy], None],
    ) -> _Written:
        """Under the role's lock: read the policy, prune it and apply ``change``; when the
        result would not fit the role's inline-policy budget, apply ``overflow`` too. Write it
        if it differs from what was read.

        NOTE: IAM has no conditional write, so the lock is what keeps two revocations from
        overwriting each other's entries (docs/backends/aws.md: several brokers need a shared
        ``role_lock``).
        """
        name = role_name(role_arn)
        with self._role_lock(role_arn):
            document = self._read_policy(name)
            budget = ROLE_INLINE_POLICIES_MAX_CHARS - self._other_inline_chars(name)
            try:
                policy = RevocationPolicy.parse(document)
            except (ValueError, TypeError, AttributeError) as exc:
                raise BackendUnavailable(
                    f"aws: role {name}'s {REVOCATION_POLICY_NAME} policy cannot be read "
                    f"({type(exc).__name__}); fix or delete it"
                ) from None
            pruned = policy.prune(now)
            change(policy)
            fell_back = policy.chars() > budget
            if fell_back:
                overflow(policy)
            if policy.chars() > budget:
                raise BackendUnavailable(
                    f"aws: role {name}'s other inline policies leave {budget} characters for "
                    f"{REVOCATION_POLICY_NAME}, which needs {policy.chars()} even as one cutoff"
                )
            if policy.to_document() != (document or RevocationPolicy.empty().to_document()):
                fell_back = self._write_policy(name, policy, overflow) or fell_back
            return _Written(policy, fell_back, policy.chars(), budget, pruned)

    def _read_policy(self, name: str) -> dict[str, Any] | None:
        try:
            answer = self._iam.get_role_policy(RoleName=name, PolicyName=REVOCATION_POLICY_NAME)
        except ClientError as exc:
            if _error_code(exc)[0] == "NoSuchEntity":
                self._check_role_exists(name)
                return None
            raise _iam_error("GetRolePolicy", name, exc) from None
        except BotoCoreError as exc:
            raise _unavailable("IAM GetRolePolicy", exc) from None
        return _as_document(answer["PolicyDocument"])

    def _check_role_exists(self, name: str) -> None:
        try:
            self._iam.get_role(RoleName=name)
        except ClientError as exc:
            raise _iam_error("GetRole", name, exc) from None
        except BotoCoreError as exc:
            raise _unavailable("IAM GetRole", exc) from None

    def _other_inline_chars(self, name: str) -> int:
        """The size of the role's other inline policies: they share the 10,240 budget."""
        total = 0
        try:
            for page in self._iam.get_paginator("list_role_policies").paginate(RoleName=name):
                for other in page["PolicyNames"]:
                    if other != REVOCATION_POLICY_NAME:
                        answer = self._iam.get_role_policy(RoleName=name, PolicyName=other)
                        total += policy_chars(_as_document(answer["PolicyDocument"]))
        except ClientError as exc:
            raise _iam_error("ListRolePolicies", name, exc) from None
        except BotoCoreError as exc:
            raise _unavailable("IAM ListRolePolicies", exc) from None
        return total

    def _write_policy(
        self, name: str, policy: RevocationPolicy, overflow: Callable[[RevocationPolicy], None]
    ) -> bool:
        """Put ``policy``; True when IAM's size check forced the ``overflow`` fallback."""
        try:
            self._put(name, policy)
            return False
        except ClientError as exc:
            if _error_code(exc)[0] != "LimitExceeded":
                raise _iam_error("PutRolePolicy", name, exc) from None
        # IAM counted more than we did (other policies changed meanwhile): use the cutoff.
        log.warning("aws: IAM says role %s's inline policies are too large; using a cutoff", name)
        overflow(policy)
        try:
            self._put(name, policy)
        except ClientError as exc:
            raise _iam_error("PutRolePolicy", name, exc) from None
        return True

    def _put(self, name: str, policy: RevocationPolicy) -> None:
        try:
            self._iam.put_role_policy(
                RoleName=name,
                PolicyName=REVOCATION_POLICY_NAME,
                PolicyDocument=_compact(policy.to_document()),
            )
        except BotoCoreError as exc:
            raise _unavailable("IAM PutRolePolicy", exc) from None

    def close(self) -> None:
        """Close the STS and IAM clients' connection pools (if they were ever made)."""
        with self._clients_guard:
            clients, self._clients = self._clients, None
            health, self._health_sts = self._health_sts, None
        for client in [*(clients or ()), *([health] if health is not None else [])]:
            client.close()

    @contextmanager
    def _process_lock(self, role_arn: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(role_arn, threading.Lock())
        with lock:
            yield

    # --- settings -------------------------------------------------------------------------------

    def _aws_models(self) -> dict[str, AwsBackendConfig]:
        return {
            name: model.backends.aws
            for name, model in self._policy.models.items()
            if model.backends.aws is not None
        }

    def _config_for(self, model: str) -> AwsBackendConfig:
        config = self._aws_models().get(model)
        if config is None:
            raise InvalidRequest(f"aws: model {model} has no aws backend settings in the policy")
        return config


def _region(session: boto3.Session) -> str:
    # NOTE: botocore reads AWS_DEFAULT_REGION only; the product promises AWS_REGION.
    return os.environ.get("AWS_REGION") or session.region_name or "us-east-1"


def _parse_iam_date(value: str) -> dt.datetime:
    """An IAM date condition value: ISO 8601 or epoch seconds. Raises ValueError."""
    if value.isdigit():
        return dt.datetime.fromtimestamp(int(value), dt.UTC)
    at = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)


def _as_document(value: object) -> dict[str, Any]:
    """IAM policy documents arrive decoded by botocore, or as (URL-decoded) JSON text."""
    if isinstance(value, str):
        loaded: dict[str, Any] = json.loads(value)
        return loaded
    if isinstance(value, dict):
        return value
    raise BackendUnavailable(f"aws: IAM returned a policy document of type {type(value).__name__}")


def _error_code(exc: ClientError) -> tuple[str, str]:
    error = exc.response.get("Error", {})
    return str(error.get("Code", "Unknown")), str(error.get("Message", ""))


def _unavailable(call: str, exc: Exception) -> BackendUnavailable:
    if isinstance(exc, ParamValidationError):
        return BackendUnavailable(f"aws: {call} request was invalid before sending: {exc}")
    return BackendUnavailable(f"aws: {call} failed: {type(exc).__name__}: {exc}")


def _iam_error(call: str, name: str, exc: ClientError) -> BackendUnavailable:
    code, message = _error_code(exc)
    log.warning("aws: IAM %s on role %s failed: %s: %s", call, name, code, message)
    hint = " (throttled or down; retry later)" if code in _CONNECTION_TROUBLE else ""
    return BackendUnavailable(
        f"aws: IAM {call} on role {name} failed: {code}{hint}", aws_error=code
    )


__all__ = [
    "DEFAULT_ACTION_ACCESS",
    "REVOCATION_POLICY_NAME",
    "SESSION_TAG_KEYS",
    "AwsBackend",
    "AwsRevocation",
    "RevocationMethod",
    "RevocationPolicy",
    "S3Access",
    "check_action_ttl",
    "credential_process_json",
    "policy_chars",
    "session_policy",
    "session_tags",
    "source_identity",
]
