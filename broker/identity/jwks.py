"""Issuer public keys: JWK sets from a file, a URL or OIDC discovery, cached per issuer.

This is the verifier's only I/O, behind the :class:`broker.identity.verifier.KeySource`
protocol. Keys are parsed once per fetched set, so a verification with a cached key does no
parsing and takes no lock. ``docs/identity.md`` describes refresh and staleness.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from broker.errors import ConfigError, IdentityRejected
from broker.identity.verifier import KeysNotReady
from broker.policy.model import ASYMMETRIC_ALGORITHMS, IssuerConfig

_log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 512 * 1024
FETCH_TIMEOUT_SECONDS = 5.0
DISCOVERY_PATH = "/.well-known/openid-configuration"
# NOTE: plain http only to this machine (tests, sidecars); anything else must be https, so a
# network attacker cannot substitute an issuer's keys.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class _Unavailable(Exception):
    """A key set could not be obtained; the message says where and why."""


@dataclass(frozen=True, slots=True)
class _KeySet:
    """One issuer's usable signing keys, parsed."""

    by_kid: Mapping[str, jwt.PyJWK]
    ambiguous: frozenset[str]
    count: int
    only: jwt.PyJWK | None
    """The single usable key, when there is exactly one (for tokens without ``kid``)."""


class _IssuerKeys:
    """Mutable cache state of one issuer; ``lock`` serialises refreshes, not lookups."""

    __slots__ = (
        "good_at",
        "keys",
        "last_attempt",
        "last_error",
        "loaded_stamp",
        "lock",
        "tried_stamp",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: _KeySet | None = None
        # Clock time at which `keys` were last fetched (or, for a file, seen unchanged).
        self.good_at = 0.0
        self.last_attempt: float | None = None
        self.last_error = "not fetched yet"
        # A file's (mtime_ns, size, inode) when `keys` were read, and when last tried.
        self.loaded_stamp: tuple[int, int, int] | None = None
        self.tried_stamp: tuple[int, int, int] | None = None


def _usable(entry: object, source: str) -> jwt.PyJWK | None:
    """The entry as a verification key, or None (logged) if it must not be used for one."""
    if not isinstance(entry, dict):
        return None
    kid = entry.get("kid")
    reason = None
    if entry.get("kty") == "oct":
        # NOTE: a symmetric key in a public key set is either a mistake or an attack.
        reason = "symmetric (kty oct)"
    elif entry.get("use", "sig") != "sig":
        reason = f"use is {entry.get('use')!r}, not 'sig'"
    elif "d" in entry:
        reason = "it contains private key material"
    elif "alg" in entry and not (
        isinstance(entry["alg"], str) and entry["alg"] in ASYMMETRIC_ALGORITHMS
    ):
        reason = f"alg {entry.get('alg')!r} is not an asymmetric signature algorithm"
    elif kid is not None and not isinstance(kid, str):
        reason = "its kid is not a string"
    if reason is None:
        try:
            return jwt.PyJWK(entry)
        except jwt.PyJWTError as e:
            reason = f"unusable: {e}"
    _log.info("ignoring key %r from %s: %s", kid, source, reason)
    return None


def _parse_jwks(document: object, source: str) -> _KeySet:
    """Parse a JWK set; raises _Unavailable if it holds no usable signing key."""
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise _Unavailable(f"{source}: not a JWK set (no 'keys' list)")
    by_kid: dict[str, jwt.PyJWK] = {}
    ambiguous: set[str] = set()
    usable: list[jwt.PyJWK] = []
    for entry in entries:
        key = _usable(entry, source)
        if key is None:
            continue
        usable.append(key)
        if key.key_id is not None:
            if key.key_id in by_kid:
                # NOTE: two keys under one kid: refuse to guess which one signed.
                ambiguous.add(key.key_id)
            by_kid[key.key_id] = key
    if not usable:
        raise _Unavailable(f"{source}: no usable signing keys")
    for kid in ambiguous:
        del by_kid[kid]
    only = usable[0] if len(usable) == 1 else None
    return _KeySet(by_kid, frozenset(ambiguous), len(usable), only)


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise _Unavailable(f"{url!r} is not a URL: {e}") from None
    if parsed.scheme == "https" or (parsed.scheme == "http" and parsed.host in LOOPBACK_HOSTS):
        return
    raise _Unavailable(f"{url} must use https (plain http only for loopback hosts)")


def _select(keys: _KeySet, issuer: IssuerConfig, kid: str | None) -> jwt.PyJWK:
    if kid is None:
        if keys.only is not None:
            return keys.only
        raise IdentityRejected(
            f"token has no kid and issuer {issuer.name!r} has {keys.count} usable keys; "
            "a kid is needed to choose"
        )
    if kid in keys.ambiguous:
        raise IdentityRejected(
            f"key {kid!r} appears more than once in the key set of issuer {issuer.name!r}"
        )
    key = keys.by_kid.get(kid)
    if key is None:
        raise IdentityRejected(
            f"key {kid!r} is not in the key set of issuer {issuer.name!r} (unknown, or rotated out)"
        )
    return key


def _ident(issuer: IssuerConfig) -> tuple[str, ...]:
    return (issuer.name, issuer.issuer, str(issuer.jwks_file), str(issuer.jwks_uri))


def _due(state: _IssuerKeys, kid: str | None, now: float, refresh_age: float) -> bool:
    """Whether a fetched key set needs a refresh: none yet, too old, or ``kid`` unknown."""
    keys = state.keys
    return (
        keys is None
        or now - state.good_at >= refresh_age
        or (kid is not None and kid not in keys.by_kid)
    )


class JWKSCache:
    """Issuer keys from ``jwks_file``, ``jwks_uri`` or OIDC discovery, cached per issuer.

    - A file is re-read when its mtime, size or inode changes.
    - A fetched set is refreshed when a token names an unknown ``kid`` or the set is older
      than ``refresh_after`` (or half the issuer's ``max_key_age``, if less); refreshes of one
      issuer happen at most once per ``min_refresh_interval`` and one at a time.
    - A failed refresh keeps the last good set; once that is older than the issuer's
      ``max_key_age``, every token of the issuer is rejected (fail closed).
    - ``static`` maps a ``dev: true`` issuer's *name* to its in-process JWK set.

    Safe to share between threads. Implements :class:`broker.identity.verifier.KeySource`.
    """

    def __init__(
        self,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        min_refresh_interval: float = 30.0,
        refresh_after: float = 300.0,
        static: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Raises :class:`ConfigError` if a ``static`` set holds no usable signing key."""
        if min_refresh_interval < 0 or refresh_after <= 0:
            raise ConfigError("min_refresh_interval must be >= 0 and refresh_after > 0")
        self._http = http
        self._owns_http = http is None
        self._http_lock = threading.Lock()
        self._clock = clock
        self._min_refresh_interval = min_refresh_interval
        self._refresh_after = refresh_after
        self._states: dict[tuple[str, ...], _IssuerKeys] = {}
        self._states_lock = threading.Lock()
        self._static: dict[str, _KeySet] = {}
        for name, document in (static or {}).items():
            try:
                self._static[name] = _parse_jwks(document, f"static keys of issuer {name!r}")
            except _Unavailable as e:
                raise ConfigError(str(e)) from None

    def close(self) -> None:
        """Close the HTTP client if this cache created it."""
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    def key_for(self, issuer: IssuerConfig, kid: str | None, *, offline: bool = False) -> jwt.PyJWK:
        """The issuer's signing key named ``kid`` (or its only key, if ``kid`` is None).

        May fetch or re-read the issuer's key set. Raises :class:`IdentityRejected` when the
        keys are unavailable or stale, or no single usable key matches ``kid``. ``offline`` (the
        event loop, ``broker.api.token.exchange``): raises :class:`KeysNotReady` instead of a
        fetch (none yet, due for a refresh, an unknown kid) or a read (a changed file).
        """
        if issuer.dev:
            # NOTE: only dev issuers take in-process keys, so a static entry can never stand
            # in for a real issuer's configured key source.
            static = self._static.get(issuer.name)
            if static is None:
                raise IdentityRejected(f"dev issuer {issuer.name!r} has no in-process keys")
            return _select(static, issuer, kid)
        state = self._state(issuer)
        now = self._clock()
        if issuer.jwks_file is not None:
            self._load_file(issuer.jwks_file, state, now, offline)
        else:
            self._refresh_if_due(issuer, state, kid, now, offline)
        keys = state.keys
        if keys is None:
            raise IdentityRejected(
                f"keys for issuer {issuer.name!r} are unavailable: {state.last_error}"
            )
        age = now - state.good_at
        if age > issuer.max_key_age:
            # NOTE: fail closed: a key set we cannot refresh may include a revoked key.
            raise IdentityRejected(
                f"keys for issuer {issuer.name!r} are stale: last refreshed {int(age)} s ago, "
                f"bound {issuer.max_key_age} s"
            )
        return _select(keys, issuer, kid)

    def age(self, issuer: IssuerConfig) -> float | None:
        """Seconds since ``issuer``'s keys were last fetched (or its file last found unchanged),
        for the metrics; None for a dev issuer and for one whose keys no token needed yet or
        that never fetched a good set. Reads the cache only: it never fetches."""
        if issuer.dev:
            return None
        state = self._states.get(_ident(issuer))
        if state is None or state.keys is None:
            return None
        return max(0.0, self._clock() - state.good_at)

    def _state(self, issuer: IssuerConfig) -> _IssuerKeys:
        # Keyed by the key source too, so a reloaded policy that moves an issuer's keys
        # never reads the old source's cache.
        ident = _ident(issuer)
        state = self._states.get(ident)
        if state is None:
            with self._states_lock:
                state = self._states.setdefault(ident, _IssuerKeys())
        return state

    def _load_file(self, path: Path, state: _IssuerKeys, now: float, offline: bool) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            state.last_error = f"cannot read {path}: {e.strerror}"
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == state.loaded_stamp:
            state.good_at = now
            return
        if offline:
            raise KeysNotReady
        with state.lock:
            if stamp in (state.loaded_stamp, state.tried_stamp):
                return
            state.tried_stamp = stamp
            try:
                with open(path, "rb") as f:
                    raw = f.read(MAX_JWKS_BYTES + 1)
                if len(raw) > MAX_JWKS_BYTES:
                    raise _Unavailable(f"{path}: larger than {MAX_JWKS_BYTES} bytes")
                state.keys = _parse_jwks(json.loads(raw), str(path))
            except (OSError, ValueError, _Unavailable) as e:
                state.last_error = f"{path}: {e}" if not isinstance(e, _Unavailable) else str(e)
                _log.warning("keeping the last good keys: %s", state.last_error)
                return
            state.loaded_stamp = stamp
            state.good_at = now

    def _refresh_if_due(
        self, issuer: IssuerConfig, state: _IssuerKeys, kid: str | None, now: float, offline: bool
    ) -> None:
        refresh_age = min(self._refresh_after, issuer.max_key_age / 2)
        if not _due(state, kid, now, refresh_age):
            return
        if offline:
            raise KeysNotReady
        with state.lock:
            last = state.last_attempt
            # Re-checked under the lock: the thread we waited for may have fetched already.
            if not _due(state, kid, now, refresh_age) or (
                last is not None and now - last < self._min_refresh_interval
            ):
                return
            state.last_attempt = now
            try:
                keys = self._fetch(issuer)
            except _Unavailable as e:
                state.last_error = str(e)
                _log.warning("refreshing keys of issuer %r failed: %s", issuer.name, e)
                return
            state.keys = keys
            state.good_at = now

    def _fetch(self, issuer: IssuerConfig) -> _KeySet:
        uri = issuer.jwks_uri if issuer.jwks_uri is not None else self._discover(issuer)
        return _parse_jwks(self._get_json(uri), uri)

    def _discover(self, issuer: IssuerConfig) -> str:
        url = issuer.issuer.rstrip("/") + DISCOVERY_PATH
        document = self._get_json(url)
        if document.get("issuer") != issuer.issuer:
            # NOTE: OpenID Connect Discovery §4.3: the document must be about this issuer.
            raise _Unavailable(
                f"{url}: names issuer {document.get('issuer')!r}, expected {issuer.issuer!r}"
            )
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri:
            raise _Unavailable(f"{url}: no jwks_uri")
        return uri

    def _client(self) -> httpx.Client:
        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False)
            return self._http

    def _get_json(self, url: str) -> dict[str, Any]:
        _check_url(url)
        body = bytearray()
        try:
            # NOTE: no redirects: a redirect could lead to plain http or another host.
            with self._client().stream(
                "GET", url, headers={"Accept": "application/json"}, follow_redirects=False
            ) as response:
                if response.status_code != 200:
                    raise _Unavailable(f"GET {url}: HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _Unavailable(f"GET {url}: larger than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as e:
            raise _Unavailable(f"GET {url}: {type(e).__name__}: {e}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise _Unavailable(f"GET {url}: not JSON") from None
        if not isinstance(document, dict):
            raise _Unavailable(f"GET {url}: not a JSON object")
        return document
