"""Sign-in with a people issuer's OpenID Connect provider: authorization code flow with PKCE
(authlib's client), then the ID token verified by the broker's own people verifier.

The provider's endpoints come from its discovery document, which must be about the issuer and,
like every URL here, use https (plain http only on loopback, as for key sets).
"""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from requests import RequestException

from broker.bounds import capped
from broker.identity.jwks import DISCOVERY_PATH, LOOPBACK_HOSTS
from broker.identity.types import Person
from broker.identity.verifier import Verifier
from broker.policy.model import ConsoleClient, IssuerConfig

TIMEOUT_S = 5.0
MAX_DISCOVERY_BYTES = 64 * 1024
CALLBACK_PATH = "/console/callback"


class SigninFailed(Exception):
    """A sign-in could not complete; the message says why (never a token or a secret)."""


def _checked_url(url: object, what: str) -> str:
    if not isinstance(url, str):
        raise SigninFailed(f"{what}: expected a URL, got {type(url).__name__}")
    parsed = httpx.URL(url)
    if parsed.scheme == "https" or (parsed.scheme == "http" and parsed.host in LOOPBACK_HOSTS):
        return url
    raise SigninFailed(f"{what} {capped(url, 200)} must use https (plain http only on loopback)")


@dataclass(frozen=True)
class Endpoints:
    authorization: str
    token: str


@dataclass(frozen=True)
class Started:
    """Where to send the browser, and what to remember until it comes back."""

    url: str
    state: str
    nonce: str
    code_verifier: str


class OidcSignin:
    """The console's OpenID Connect client for one people issuer."""

    def __init__(
        self,
        issuer: IssuerConfig,
        client: ConsoleClient,
        *,
        secret: str | None,
        redirect_url: str,
    ) -> None:
        self.issuer = issuer
        self.client = client
        self._secret = secret
        self.redirect_url = redirect_url
        self._endpoints: Endpoints | None = None
        self._lock = threading.Lock()

    def _client(self) -> OAuth2Session:
        session = OAuth2Session(
            client_id=self.client.client_id,
            client_secret=self._secret,
            # NOTE: a public client (no secret) authenticates by PKCE alone.
            token_endpoint_auth_method="client_secret_basic" if self._secret else "none",
            scope=" ".join(self.client.scopes),
            redirect_uri=self.redirect_url,
            code_challenge_method="S256",
        )
        session.trust_env = False  # no proxy or netrc from the environment
        return session

    def endpoints(self) -> Endpoints:
        """The provider's authorization and token endpoints (discovery, fetched once)."""
        with self._lock:
            if self._endpoints is None:
                self._endpoints = self._discover()
            return self._endpoints

    def _discover(self) -> Endpoints:
        url = _checked_url(self.issuer.issuer.rstrip("/") + DISCOVERY_PATH, "discovery")
        try:
            with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as http:
                response = http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise SigninFailed(f"GET {url}: {type(exc).__name__}") from None
        if response.status_code != 200 or len(response.content) > MAX_DISCOVERY_BYTES:
            raise SigninFailed(f"GET {url}: HTTP {response.status_code}")
        try:
            document: Any = response.json()
        except ValueError:
            raise SigninFailed(f"GET {url}: not JSON") from None
        if not isinstance(document, dict) or document.get("issuer") != self.issuer.issuer:
            # NOTE: OpenID Connect Discovery §4.3: the document must be about this issuer.
            raise SigninFailed(f"{url}: the document is not about issuer {self.issuer.issuer}")
        return Endpoints(
            _checked_url(document.get("authorization_endpoint"), "authorization_endpoint"),
            _checked_url(document.get("token_endpoint"), "token_endpoint"),
        )

    def start(self) -> Started:
        """A new authorization request: fresh ``state``, ``nonce`` and PKCE verifier."""
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        with self._client() as client:
            url, _ = client.create_authorization_url(
                self.endpoints().authorization, state=state, code_verifier=verifier, nonce=nonce
            )
        return Started(str(url), state, nonce, verifier)

    def finish(
        self,
        verifier: Verifier,
        *,
        code: str,
        code_verifier: str,
        nonce: str,
    ) -> tuple[str, Person]:
        """Redeem ``code`` at the token endpoint, verify the ID token with the broker's people
        verifier (issuer, audience, signature, times, roles claim) and its ``nonce``.
        Returns (ID token, person). Raises SigninFailed or IdentityRejected."""
        try:
            with self._client() as client:
                token = client.fetch_token(
                    self.endpoints().token,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                    timeout=TIMEOUT_S,
                    allow_redirects=False,
                )
        except OAuthError as exc:
            raise SigninFailed(f"the token endpoint refused the code: {exc.error}") from None
        except RequestException as exc:
            raise SigninFailed(f"the token endpoint: {type(exc).__name__}") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SigninFailed("the token endpoint returned no ID token (is openid a scope?)")
        person = verifier.verify_person(id_token)
        if person.issuer_name != self.issuer.name:
            raise SigninFailed(f"the ID token is from {person.issuer_name}, not {self.issuer.name}")
        # The signature was verified just above, so these claims are the issuer's.
        claims = jwt.decode(id_token, options={"verify_signature": False})
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got, nonce):
            # NOTE: the nonce ties the ID token to this browser's sign-in (no replayed token).
            raise SigninFailed("the ID token's nonce is not this sign-in's")
        return id_token, person
