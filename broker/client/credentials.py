"""Typed credentials from the broker for training code: one call, cached and refreshed.

    from broker.client import credentials
    aws = credentials(model="llama-7b", action="evaluate", backend="aws")
    boto3.Session(aws_access_key_id=aws.access_key_id, ...)

The workload's identity token is found as ``broker agent`` finds it (:mod:`broker.client.sources`).
A credential is reused until about two thirds of its lifetime have passed (with jitter, so that
many workers do not exchange at once), then exchanged again; when that fails, the last good
credential is returned until it expires.

NOTE: lean like :mod:`broker.client.http`: no server code is imported here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.client.http import BrokerClient, ClientError
from broker.client.sources import TokenSource, find_source

log = logging.getLogger(__name__)

TOKEN_TYPES = {
    "jwt": "urn:ietf:params:oauth:token-type:jwt",
    "vault": "urn:broker:token-type:vault-token",
    "aws": "urn:broker:token-type:aws-credentials",
}
TOKEN_TYPE_DATABASE = "urn:broker:token-type:database-credentials"  # noqa: S105 (a URN)
DEFAULT_URL = "http://127.0.0.1:8080"
REFRESH_AT = 2 / 3
"""Exchange again once this share of the lifetime has passed..."""
JITTER = 0.1
"""...less up to this share of the lifetime, at random."""


@dataclass(frozen=True, repr=False)
class Credential:
    """What every exchange answers: the grant, its kind and when it ends. ``repr`` and ``str``
    never show secret material."""

    grant_id: str
    issued_token_type: str
    issued_at: dt.datetime
    expires_at: dt.datetime

    @property
    def ttl_seconds(self) -> float:
        return (self.expires_at - self.issued_at).total_seconds()

    def secrets(self) -> list[str]:
        """Every secret value this credential holds (to mask in CI logs)."""
        return []

    def env(self) -> dict[str, str]:
        """The credential as environment variables."""
        return {"BROKER_GRANT_ID": self.grant_id, "BROKER_EXPIRES_AT": _iso(self.expires_at)}

    def fields(self) -> dict[str, str]:
        """Every part of the credential, secrets included, by name."""
        return {
            "grant_id": self.grant_id,
            "issued_token_type": self.issued_token_type,
            "expires_at": _iso(self.expires_at),
        }

    def __repr__(self) -> str:
        expires = _iso(self.expires_at)
        return f"{type(self).__name__}(grant_id={self.grant_id!r}, expires_at={expires})"


@dataclass(frozen=True, repr=False)
class BrokerJWT(Credential):
    token: str = field(default="")

    def secrets(self) -> list[str]:
        return [self.token]

    def env(self) -> dict[str, str]:
        return {"BROKER_JWT": self.token, **super().env()}

    def fields(self) -> dict[str, str]:
        return {**super().fields(), "token": self.token}


@dataclass(frozen=True, repr=False)
class VaultToken(Credential):
    token: str = field(default="")

    def secrets(self) -> list[str]:
        return [self.token]

    def env(self) -> dict[str, str]:
        return {"VAULT_TOKEN": self.token, **super().env()}

    def fields(self) -> dict[str, str]:
        return {**super().fields(), "token": self.token}


@dataclass(frozen=True, repr=False)
class DatabaseLogin(Credential):
    username: str = field(default="")
    password: str = field(default="")

    def secrets(self) -> list[str]:
        return [self.password]

    def env(self) -> dict[str, str]:
        return {"DB_USERNAME": self.username, "DB_PASSWORD": self.password, **super().env()}

    def fields(self) -> dict[str, str]:
        return {**super().fields(), "username": self.username, "password": self.password}


@dataclass(frozen=True, repr=False)
class AwsCredentials(Credential):
    access_key_id: str = field(default="")
    secret_access_key: str = field(default="")
    session_token: str = field(default="")

    def secrets(self) -> list[str]:
        # The key id too, as aws-actions/configure-aws-credentials masks it: it names the
        # session in every log line that quotes it.
        return [self.access_key_id, self.secret_access_key, self.session_token]

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_CREDENTIAL_EXPIRATION": _iso(self.expires_at),
            **super().env(),
        }

    def fields(self) -> dict[str, str]:
        return {
            **super().fields(),
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
        }

    def process_json(self) -> str:
        """What an AWS SDK reads from a ``credential_process`` command (Version 1)."""
        return json.dumps(
            {
                "Version": 1,
                "AccessKeyId": self.access_key_id,
                "SecretAccessKey": self.secret_access_key,
                "SessionToken": self.session_token,
                "Expiration": _iso(self.expires_at),
            }
        )


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def env_lines(credential: Credential) -> str:
    """``NAME=value`` lines, shell-quoted (``set -a; . FILE`` or ``export $(...)``)."""
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in credential.env().items())


def parse_answer(answer: dict[str, Any], now: dt.datetime | None = None) -> Credential:
    """The typed credential in a ``POST /v1/token`` answer received at ``now``.

    Raises:
        ValueError: the answer lacks a part its token type needs (named, never its value).
    """
    issued = now or dt.datetime.now(dt.UTC)
    try:
        common: dict[str, Any] = {
            "grant_id": str(answer["grant_id"]),
            "issued_token_type": str(answer["issued_token_type"]),
            "issued_at": issued,
            "expires_at": issued + dt.timedelta(seconds=int(answer["expires_in"])),
        }
        kind = common["issued_token_type"]
        if kind == TOKEN_TYPES["aws"]:
            aws = answer["aws_credentials"]
            expires = dt.datetime.fromisoformat(str(aws["expiration"]).replace("Z", "+00:00"))
            return AwsCredentials(
                **{**common, "expires_at": min(expires, common["expires_at"])},
                access_key_id=str(aws["access_key_id"]),
                secret_access_key=str(aws["secret_access_key"]),
                session_token=str(aws["session_token"]),
            )
        if kind == TOKEN_TYPE_DATABASE:
            return DatabaseLogin(
                **common, username=str(answer["username"]), password=str(answer["access_token"])
            )
        if kind == TOKEN_TYPES["vault"]:
            return VaultToken(**common, token=str(answer["access_token"]))
        if kind == TOKEN_TYPES["jwt"]:
            return BrokerJWT(**common, token=str(answer["access_token"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the broker's answer lacks a usable {exc}") from None
    raise ValueError(f"unknown issued_token_type {kind!r}")


def refresh_delay(credential: Credential, rand: Callable[[], float] = random.random) -> float:
    """Seconds from issuance until the credential should be exchanged again: about two thirds
    of its lifetime, earlier by up to a tenth of it at random."""
    return max(0.0, credential.ttl_seconds * (REFRESH_AT - JITTER * rand()))


class Provider:
    """One model/action/backend's credential: exchanged when first asked for and again after
    :func:`refresh_delay`; thread-safe (one exchange at a time, others wait for its result)."""

    def __init__(
        self,
        client: BrokerClient,
        source: TokenSource,
        *,
        model: str,
        action: str,
        backend: str = "jwt",
        audience: str | None = None,
        requested_ttl: int | None = None,
        reason: str | None = None,
    ) -> None:
        if backend not in TOKEN_TYPES:
            raise ValueError(f"backend: expected one of {', '.join(TOKEN_TYPES)}, got {backend!r}")
        self.client, self.source = client, source
        self.model, self.action, self.backend = model, action, backend
        self.audience, self.requested_ttl, self.reason = audience, requested_ttl, reason
        self._lock = threading.Lock()
        self._current: Credential | None = None
        self._refresh_at = 0.0  # time.monotonic()

    def _fetch(self, approval_id: str | None = None) -> Credential:
        answer = self.client.exchange(
            self.source(),
            model=self.model,
            action=self.action,
            requested_token_type=TOKEN_TYPES[self.backend],
            audience=self.audience,
            reason=self.reason,
            approval_id=approval_id,
            requested_ttl=str(self.requested_ttl) if self.requested_ttl else None,
        )
        try:
            return parse_answer(answer)
        except ValueError as exc:
            raise ClientError(None, "not_a_broker", str(exc)) from None

    def _remember(self, credential: Credential) -> float:
        """Cache ``credential``; the seconds until it is due for refresh."""
        delay = refresh_delay(credential)
        self._current, self._refresh_at = credential, time.monotonic() + delay
        return delay

    def exchange(self, approval_id: str | None = None) -> tuple[Credential, float]:
        """A new credential now (the token source is read again) and the seconds until it is
        due for refresh. Raises ClientError (the broker's refusal, or unreachable), OSError
        or ValueError (the token source)."""
        with self._lock:
            credential = self._fetch(approval_id)
            return credential, self._remember(credential)

    def get(self) -> Credential:
        """The cached credential, or a new one once it is due for refresh. When the exchange
        fails, the last good credential is returned (with a warning) until it expires.

        Raises:
            ClientError: the exchange failed and there is no unexpired credential.
        """
        with self._lock:
            current = self._current
            if current is not None and time.monotonic() < self._refresh_at:
                return current
            try:
                credential = self._fetch()
            except (ClientError, ValueError, OSError) as exc:
                if current is not None and dt.datetime.now(dt.UTC) < current.expires_at:
                    log.warning("refresh failed, keeping %r until it expires: %s", current, exc)
                    return current
                raise
            self._remember(credential)
            return credential


_providers: dict[tuple[Any, ...], Provider] = {}
_providers_lock = threading.Lock()


def credentials(
    *,
    model: str,
    action: str,
    backend: str = "jwt",
    url: str | None = None,
    audience: str | None = None,
    requested_ttl: int | None = None,
    reason: str | None = None,
    token_file: str | None = None,
    token_env: str | None = None,
    github_actions: bool | None = None,
    oidc_audience: str | None = None,
) -> Credential:
    """A credential for ``action`` on ``model`` through ``backend`` (``jwt``, ``vault``,
    ``aws``), from the broker at ``url`` (default ``$BROKER_URL``, else the local dev broker).

    The workload token comes from ``token_file``, ``token_env`` or ``github_actions``, else as
    :func:`broker.client.sources.find_source` finds it. The same arguments in the same process
    share one cached, refreshed credential.

    Raises:
        ClientError: the broker refused (``code`` says why; ``approval_required`` carries the
            ``approval_id`` to review) or could not be reached, and no unexpired credential is
            cached.
        ValueError: no token source was found, or an argument is invalid.
    """
    base = url or os.environ.get("BROKER_URL") or DEFAULT_URL
    key = (base, model, action, backend, audience, requested_ttl, token_file, token_env)
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            source = find_source(
                token_file=token_file,
                token_env=token_env,
                github_actions=github_actions,
                oidc_audience=oidc_audience,
            )
            provider = Provider(
                BrokerClient(base),
                source,
                model=model,
                action=action,
                backend=backend,
                audience=audience,
                requested_ttl=requested_ttl,
                reason=reason,
            )
            _providers[key] = provider
    return provider.get()
