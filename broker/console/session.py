"""Console cookies: sealed (AES-GCM) values with a purpose and an expiry, the session, and its
CSRF token.

Three cookies, each sealed under the console key with its purpose as associated data, so one
can never be replayed as another:

- the **session** (``SameSite=Strict``): the person's verified ID token, re-verified by the
  broker's people verifier on every request, a CSRF token and an expiry no later than the ID
  token's ``exp`` and :data:`MAX_SESSION_S` after sign-in;
- the **login state** (``SameSite=Lax``, path ``/console/callback``, 10 minutes): ``state``,
  ``nonce`` and the PKCE verifier of one sign-in. Lax, because the identity provider's redirect
  back is a cross-site navigation that drops Strict cookies;
- the **form token** (``SameSite=Strict``): the CSRF token of the forms shown before anyone
  is signed in (the dev sign-in form).

NOTE: sessions are stateless: signing out deletes the cookie in the browser, but a copy of it
stays valid until it expires (at most :data:`MAX_SESSION_S`). The console key is sealed in the
store (:func:`cookie_key`), so every worker and replica on one store accepts every session.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starlette.responses import Response

from broker.errors import ConfigError
from broker.identity.jwks import LOOPBACK_HOSTS
from broker.keys.store import ACTIVE, CONSOLE_COOKIE, KeyStore, NewKey

SESSION_COOKIE = "broker_console"
LOGIN_COOKIE = "broker_console_login"
FORM_COOKIE = "broker_console_form"
MAX_SESSION_S = 3600
"""A session lasts at most this long after sign-in (and never past the ID token's ``exp``)."""
LOGIN_TTL_S = 600
"""A sign-in must come back from the identity provider within this."""
MAX_COOKIE_CHARS = 4096
CSRF_FIELD = "csrf"

_SESSION, _LOGIN, _FORM = b"console session", b"console login", b"console form"


def cookie_key(keys: KeyStore) -> bytes:
    """The console's 256-bit cookie key, sealed in the store like every other key (created on
    first use; replicas and workers on one store find the same one, so each accepts the
    sessions of the others). Raises ConfigError."""
    (stored,), _ = keys.ensure(
        CONSOLE_COOKIE,
        lambda: [NewKey(kid="console-cookie", slot=ACTIVE, secret=AESGCM.generate_key(256))],
    )
    if len(stored.secret) != 32:
        raise ConfigError(f"the store's console cookie key is {len(stored.secret)} bytes, not 32")
    return stored.secret


class Sealer:
    """Seals JSON values with AES-256-GCM: confidential, tamper-evident, bound to a purpose
    and an expiry."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, purpose: bytes, payload: dict[str, Any], expires_at: int) -> str:
        nonce = os.urandom(12)
        body = json.dumps({**payload, "exp": expires_at}, separators=(",", ":")).encode()
        sealed = nonce + self._aead.encrypt(nonce, body, purpose)
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, purpose: bytes, value: str | None, now: float) -> dict[str, Any] | None:
        """The payload, or None when ``value`` is missing, forged, for another purpose or
        expired."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            body = self._aead.decrypt(raw[:12], raw[12:], purpose)
        except (binascii.Error, ValueError, InvalidTag):
            return None
        payload: dict[str, Any] = json.loads(body)
        exp = payload.get("exp")
        if not isinstance(exp, int) or exp <= now:
            return None
        return payload


@dataclass(frozen=True)
class Session:
    """A signed-in browser: the person's ID token (verified again on each use), the CSRF
    token of its forms, and when it ends."""

    id_token: str
    csrf: str
    expires_at: int


@dataclass(frozen=True)
class LoginState:
    """One sign-in under way, kept in the login cookie until the identity provider returns."""

    issuer: str
    state: str
    nonce: str
    code_verifier: str


def csrf_matches(expected: str, submitted: str | None) -> bool:
    """Constant-time comparison of a form's CSRF token with the one it must carry."""
    return submitted is not None and hmac.compare_digest(
        expected.encode("utf-8"), submitted.encode("utf-8", "replace")
    )


def secure_cookies(issuer_url: str) -> bool:
    """``Secure`` cookies, except for a broker served over plain http on loopback (dev, tests),
    where a browser would never send them back."""
    parts = urlsplit(issuer_url)
    return not (parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_HOSTS)


class Cookies:
    """Reads and writes the console's cookies."""

    def __init__(self, key: bytes, *, secure: bool, clock: Callable[[], float] = time.time) -> None:
        self._sealer = Sealer(key)
        self.secure = secure
        self.clock = clock
        """Seconds since the epoch: when sessions, sign-ins and form tokens end."""

    def now(self) -> float:
        return float(self.clock())

    # --- the session ---------------------------------------------------------------------------

    def start_session(self, response: Response, id_token: str, token_exp: int) -> Session:
        """Set a new session cookie for ``id_token`` (fresh CSRF token), ending at the token's
        ``exp`` or :data:`MAX_SESSION_S` from now, whichever comes first."""
        now = int(self.now())
        session = Session(id_token, secrets.token_urlsafe(32), min(token_exp, now + MAX_SESSION_S))
        value = self._sealer.seal(
            _SESSION, {"token": session.id_token, "csrf": session.csrf}, session.expires_at
        )
        self._set(response, SESSION_COOKIE, value, session.expires_at - now, "strict", "/console")
        return session

    def session(self, cookies: dict[str, str]) -> Session | None:
        payload = self._sealer.open(_SESSION, cookies.get(SESSION_COOKIE), self.now())
        if payload is None:
            return None
        return Session(str(payload["token"]), str(payload["csrf"]), int(payload["exp"]))

    def end_session(self, response: Response) -> None:
        self._delete(response, SESSION_COOKIE, "strict", "/console")

    # --- the login state -----------------------------------------------------------------------

    def start_login(self, response: Response, login: LoginState) -> None:
        expires = int(self.now()) + LOGIN_TTL_S
        payload = {
            "issuer": login.issuer,
            "state": login.state,
            "nonce": login.nonce,
            "verifier": login.code_verifier,
        }
        value = self._sealer.seal(_LOGIN, payload, expires)
        self._set(response, LOGIN_COOKIE, value, LOGIN_TTL_S, "lax", "/console/callback")

    def login(self, cookies: dict[str, str]) -> LoginState | None:
        payload = self._sealer.open(_LOGIN, cookies.get(LOGIN_COOKIE), self.now())
        if payload is None:
            return None
        return LoginState(
            str(payload["issuer"]),
            str(payload["state"]),
            str(payload["nonce"]),
            str(payload["verifier"]),
        )

    def end_login(self, response: Response) -> None:
        self._delete(response, LOGIN_COOKIE, "lax", "/console/callback")

    # --- forms shown before sign-in ------------------------------------------------------------

    def form_token(self, cookies: dict[str, str]) -> str:
        """The CSRF token for forms shown to someone not signed in: the one in their form
        cookie, or a new one (:meth:`keep_form_token` sets it)."""
        payload = self._sealer.open(_FORM, cookies.get(FORM_COOKIE), self.now())
        return str(payload["csrf"]) if payload is not None else secrets.token_urlsafe(32)

    def keep_form_token(self, response: Response, token: str) -> None:
        expires = int(self.now()) + LOGIN_TTL_S
        value = self._sealer.seal(_FORM, {"csrf": token}, expires)
        self._set(response, FORM_COOKIE, value, LOGIN_TTL_S, "strict", "/console")

    def form_token_matches(self, cookies: dict[str, str], submitted: str | None) -> bool:
        payload = self._sealer.open(_FORM, cookies.get(FORM_COOKIE), self.now())
        return payload is not None and csrf_matches(str(payload["csrf"]), submitted)

    # --- cookie attributes ---------------------------------------------------------------------

    def _set(
        self, response: Response, name: str, value: str, max_age: int, samesite: str, path: str
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max(max_age, 0),
            path=path,
            secure=self.secure,
            httponly=True,
            samesite=samesite,  # type: ignore[arg-type]
        )

    def _delete(self, response: Response, name: str, samesite: str, path: str) -> None:
        response.delete_cookie(
            name,
            path=path,
            secure=self.secure,
            httponly=True,
            samesite=samesite,  # type: ignore[arg-type]
        )
