"""The backend Protocol and its registry.

A backend turns a committed grant into a credential and revokes it again. Each is chosen by the
request's ``requested_token_type``; every backend passes the shared conformance tests in
``tests/backends/test_conformance.py``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from broker.bounds import shown
from broker.errors import InvalidRequest
from broker.grants.model import Grant

TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (a URN, not a secret)
TOKEN_TYPE_VAULT = "urn:broker:token-type:vault-token"  # noqa: S105 (a URN, not a secret)
TOKEN_TYPE_AWS = "urn:broker:token-type:aws-credentials"  # noqa: S105 (a URN, not a secret)
BACKEND_FOR_TOKEN_TYPE = {TOKEN_TYPE_JWT: "jwt", TOKEN_TYPE_VAULT: "vault", TOKEN_TYPE_AWS: "aws"}


@dataclass(frozen=True, slots=True)
class Credential:
    """What a backend hands out. ``access_token`` is secret: it is never logged or stored."""

    access_token: str = field(repr=False)
    issued_token_type: str
    token_type: str
    expires_at: dt.datetime
    credential_ref: str | None = None
    """A non-secret handle the backend can revoke by (jti, accessor, lease id)."""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


class Backend(Protocol):
    name: str
    token_type: str
    external: bool
    """True when issuing creates state outside the broker (a Vault token, an AWS session):
    such grants are written ``issuing`` before the backend is called, so a crash in between
    leaves a row the reconciler can act on."""

    def issue(self, grant: Grant) -> Credential:
        """Mint a credential for ``grant``. Raises BackendUnavailable when it cannot."""
        ...

    def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
        """Make the credential stop working at the backend; True once the backend confirmed."""
        ...


@runtime_checkable
class Refreshing(Protocol):
    """A backend whose ``issue`` now and then reads the store first (the jwt backend: its
    signing keys' generation, see broker.backends.keys.REFRESH_S)."""

    def refresh_due(self) -> bool:
        """Whether the next ``issue`` would read the store (so may wait: not on the loop)."""
        ...


@runtime_checkable
class Reconcilable(Protocol):
    """A backend that can list the live credentials it issued for grants (reconciler)."""

    def list_live(self, *, min_age_s: int = 0) -> list[tuple[str, str]]:
        """(grant_id, credential_ref) of every live credential carrying broker metadata."""
        ...

    def revoke_ref(self, grant_id: str, credential_ref: str) -> bool:
        """Revoke one such credential; True once the backend confirmed."""
        ...


@runtime_checkable
class ExplainedRevocation(Protocol):
    """A backend whose revocation can say what it did (for the audit event), e.g. that AWS had
    to fall back from a per-grant Deny to a time cutoff for the whole role."""

    def revoke_explained(
        self, grant: Grant, credential_ref: str | None
    ) -> tuple[bool, dict[str, Any]]: ...


@runtime_checkable
class HealthChecked(Protocol):
    """A backend that can say cheaply whether it could serve now (for ``GET /readyz``)."""

    def ready(self) -> str | None:
        """None when the backend answers, else what is wrong (names the backend and the
        address, never a secret). Cached for a few seconds (:class:`CachedProbe`): polling it
        does not hammer the backend."""
        ...


READY_CACHE_S = 5.0
"""How long a readiness probe's outcome is reused: ``/readyz`` is unauthenticated and may be
polled often, and each probe costs the backend (or the disk) a request (or an fsync)."""


class CachedProbe:
    """Runs ``probe`` (None when healthy, else the problem) at most once per ``ttl`` seconds;
    calls in between get its last outcome. One call probes at a time, so a burst of pollers
    costs one probe. ``clock`` (monotonic seconds) may be replaced, e.g. by tests."""

    def __init__(self, probe: Callable[[], str | None], *, ttl: float = READY_CACHE_S) -> None:
        self._probe = probe
        self._ttl = ttl
        self._lock = threading.Lock()
        self._at: float | None = None
        self._outcome: str | None = None
        self.clock: Callable[[], float] = time.monotonic

    def __call__(self) -> str | None:
        with self._lock:
            now = self.clock()
            if self._at is None or now - self._at >= self._ttl:
                self._outcome = self._probe()
                self._at = self.clock()
            return self._outcome


class CallObserver(Protocol):
    """Told about every backend call (the metrics' per-backend latency and errors)."""

    def __call__(self, backend: str, operation: str, seconds: float, failed: bool) -> None: ...


@dataclass(slots=True)
class Call:
    """One timed backend call; the caller sets ``failed`` when it returned a failure (a
    revocation the backend did not confirm); one that raised is failed anyway."""

    failed: bool = False


class BackendRegistry:
    def __init__(
        self, backends: Mapping[str, Backend], *, observe: CallObserver | None = None
    ) -> None:
        self._backends = dict(backends)
        self._observe = observe

    @contextmanager
    def timed(self, backend: str, operation: str) -> Iterator[Call]:
        """Time the call to ``backend`` made in the block (``operation``: ``issue`` or
        ``revoke``) for the observer given at construction, if any."""
        call = Call()
        started = time.perf_counter()
        try:
            yield call
        except BaseException:
            call.failed = True
            raise
        finally:
            if self._observe is not None:
                self._observe(backend, operation, time.perf_counter() - started, call.failed)

    def names(self) -> list[str]:
        return sorted(self._backends)

    def all(self) -> list[Backend]:
        return [self._backends[name] for name in self.names()]

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise InvalidRequest(
                f"backend {name!r} is not enabled on this broker (enabled: {self.names()})"
            ) from None

    def for_token_type(self, token_type: str) -> Backend:
        """The backend that issues ``requested_token_type``; InvalidRequest if none does."""
        name = BACKEND_FOR_TOKEN_TYPE.get(token_type)
        if name is None:
            known = ", ".join(BACKEND_FOR_TOKEN_TYPE)
            raise InvalidRequest(
                f"requested_token_type {shown(token_type)} is not supported; use one of {known}"
            )
        return self.get(name)
