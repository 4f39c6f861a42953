"""A real OpenID provider for the console's tests: authlib's authorization server (code flow,
PKCE, ID tokens) on Flask, with an RSA key generated when it starts.

Its login page is a form that picks one of the configured users (no password: it stands for
whatever the people issuer's own login is). ID tokens carry ``groups``, the roles claim of the
tests' people issuer. Served by werkzeug on a free loopback port, in a thread, stopped by the
context manager.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import escape
from typing import Any, ClassVar

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, jsonify, request
from joserfc.jwk import RSAKey
from werkzeug.serving import WSGIRequestHandler, make_server

from tests.poll import SERVE_POLL_S

GROUPS_CLAIM = "groups"


@dataclass(frozen=True)
class User:
    sub: str
    groups: list[str]


@dataclass
class _Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    redirect_uri: str
    secret: str | None

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in (scope or "").split() if s in {"openid", "profile", "groups"})

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret is not None and hmac.compare_digest(client_secret, self.secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == ("client_secret_basic" if self.secret else "none")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class _Code(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: User
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


class Provider:
    """The provider's state: its key, client, users, and the codes it handed out."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        redirect_uri: str,
        users: dict[str, list[str]],
        client_secret: str | None = None,
        id_token_ttl: int = 3600,
    ) -> None:
        self.url = url
        self.key = RSAKey.generate_key(2048, parameters={"kid": secrets.token_hex(8)})
        self.client = _Client(client_id, redirect_uri, client_secret)
        self.users = {sub: User(sub, groups) for sub, groups in users.items()}
        self.id_token_ttl = id_token_ttl
        self.codes: dict[str, _Code] = {}
        self.tokens_issued = 0
        self.audience: str | None = None
        """The ID tokens' ``aud`` when set (default: the client id), to test refusals."""
        self.app = self._app()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def _app(self) -> Flask:
        app = Flask("test-oidc-provider")
        server = AuthorizationServer(
            app,
            query_client=lambda cid: self.client if cid == self.client.client_id else None,
            save_token=lambda _token, _request: None,
        )
        provider = self

        class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
            TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["none", "client_secret_basic"]

            def save_authorization_code(self, code: str, req: Any) -> None:
                data = req.payload.data
                provider.codes[code] = _Code(
                    code=code,
                    client_id=req.client.get_client_id(),
                    redirect_uri=req.payload.redirect_uri,
                    scope=req.scope,
                    user=req.user,
                    nonce=data.get("nonce"),
                    code_challenge=data.get("code_challenge"),
                    code_challenge_method=data.get("code_challenge_method"),
                )

            def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
                found = provider.codes.get(code)
                return found if found and found.client_id == client.client_id else None

            def delete_authorization_code(self, authorization_code: _Code) -> None:
                provider.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code: _Code) -> User:
                return authorization_code.user

        class IdToken(OpenIDCode):  # type: ignore[misc]
            def exists_nonce(self, nonce: str, _req: Any) -> bool:
                return any(c.nonce == nonce for c in provider.codes.values())

            def resolve_client_private_key(self, _client: Any) -> RSAKey:
                return provider.key

            def get_client_algorithm(self, _client: Any) -> str:
                return "RS256"

            def get_encode_header(self, _client: Any) -> dict[str, str]:
                return {"alg": "RS256", "kid": str(provider.key.kid), "typ": "JWT"}

            def get_client_claims(self, client: _Client) -> dict[str, Any]:
                provider.tokens_issued += 1
                return {
                    "iss": provider.url,
                    "aud": provider.audience or client.client_id,
                    "exp": int(time.time()) + provider.id_token_ttl,
                }

            def generate_user_info(self, user: User, _scope: str) -> UserInfo:
                return UserInfo(sub=user.sub, **{GROUPS_CLAIM: user.groups})

        server.register_grant(
            CodeGrant, [CodeChallenge(required=True), IdToken(require_nonce=True)]
        )

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return jsonify(
                issuer=self.url,
                authorization_endpoint=f"{self.url}/authorize",
                token_endpoint=f"{self.url}/token",
                jwks_uri=f"{self.url}/jwks",
                response_types_supported=["code"],
                subject_types_supported=["public"],
                id_token_signing_alg_values_supported=["RS256"],
                code_challenge_methods_supported=["S256"],
                token_endpoint_auth_methods_supported=["none", "client_secret_basic"],
            )

        @app.get("/jwks")
        def jwks() -> Any:
            return jsonify(self.jwks())

        @app.route("/authorize", methods=["GET", "POST"])
        def authorize() -> Any:
            if request.method == "GET":
                server.get_consent_grant(end_user=None)  # refuses a bad request before login
                options = "".join(
                    f'<option value="{escape(sub)}">{escape(sub)}</option>' for sub in self.users
                )
                query = escape(request.query_string.decode())
                return (
                    "<!doctype html><title>Test IdP sign-in</title><h1>Test IdP</h1>"
                    f'<form method="post" action="/authorize?{query}">'
                    f'<label for="user">User</label> <select id="user" name="user">{options}'
                    '</select> <button type="submit">Sign in at the IdP</button></form>'
                )
            user = self.users.get(request.form.get("user", ""))
            return server.create_authorization_response(grant_user=user)

        @app.post("/token")
        def token() -> Any:
            return server.create_token_response()

        return app


class _Quiet(WSGIRequestHandler):
    def log_request(self, *_args: Any) -> None:
        """No access log: its query strings carry codes and states."""


@contextmanager
def run_provider(
    port: int,
    *,
    client_id: str,
    redirect_uri: str,
    users: dict[str, list[str]],
    client_secret: str | None = None,
    id_token_ttl: int = 3600,
) -> Iterator[Provider]:
    """A provider at ``http://127.0.0.1:<port>``, served until the block ends."""
    provider = Provider(
        f"http://127.0.0.1:{port}",
        client_id=client_id,
        redirect_uri=redirect_uri,
        users=users,
        client_secret=client_secret,
        id_token_ttl=id_token_ttl,
    )
    server = make_server("127.0.0.1", port, provider.app, threaded=True, request_handler=_Quiet)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
