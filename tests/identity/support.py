"""Helpers for identity tests: signers that mint real JWTs, a movable clock, policies, and a
real local HTTP server that counts requests."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from broker.identity import Verifier
from broker.policy.model import Policy

NOW = 1_760_000_000.0
AUDIENCE = "model-broker"
CI = "https://ci.example.com"
GITHUB = "https://token.actions.githubusercontent.com"
GITLAB = "https://gitlab.com"
CLUSTER = "https://kubernetes.default.svc.cluster.local"
MESH = "https://spire.example.org"
SSO = "https://sso.example.com"
ROLE_GROUPS = {"ml-platform-admins": "admin", "ml-safety-reviewers": "approver"}
DROP = object()
"""A claim override that removes the claim."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


@dataclass(frozen=True)
class Signer:
    """A private key with its kid and algorithm, able to publish its JWK and sign tokens."""

    private_key: Any
    alg: str
    kid: str | None

    def jwk(self, **extra: Any) -> dict[str, Any]:
        to_jwk = RSAAlgorithm.to_jwk if self.alg.startswith(("RS", "PS")) else ECAlgorithm.to_jwk
        data: dict[str, Any] = json.loads(to_jwk(self.private_key.public_key()))
        data.update({"use": "sig", "alg": self.alg})
        if self.kid is not None:
            data["kid"] = self.kid
        data.update(extra)
        return data

    def with_kid(self, kid: str | None) -> Signer:
        return Signer(self.private_key, self.alg, kid)

    def sign(self, payload: dict[str, Any], **headers: Any) -> str:
        """A JWT signed with PyJWT; ``headers`` are added to (or override) alg/kid."""
        base = {"kid": self.kid} if self.kid is not None else {}
        return jwt.encode(payload, self.private_key, algorithm=self.alg, headers=base | headers)

    def craft(self, header: dict[str, Any], payload: dict[str, Any]) -> str:
        """A token with exactly this header, signed by hand with this key and algorithm."""
        return self.craft_raw(header, json.dumps(payload).encode())

    def craft_raw(self, header: dict[str, Any], payload: bytes) -> str:
        """A token over a payload given as raw bytes (for malformed JSON), properly signed."""
        signing_input = f"{b64json(header)}.{b64(payload)}"
        signature = get_default_algorithms()[self.alg].sign(
            signing_input.encode(), self.private_key
        )
        return f"{signing_input}.{b64(signature)}"


def jwks(*keys: Any) -> dict[str, Any]:
    return {"keys": list(keys)}


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_jwks(path: Path, *keys: Any, mtime: float | None = None) -> None:
    """Write a JWK set; an explicit mtime makes the change visible on coarse-mtime filesystems."""
    path.write_text(json.dumps(jwks(*keys)))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def make_policy(*issuers: dict[str, Any]) -> Policy:
    return Policy.model_validate(
        {
            "issuers": list(issuers),
            "actions": {"evaluate": {"tier": "low", "max_ttl": "1h"}},
            "models": {"llama-7b": {}},
        }
    )


def roles_for(groups: Any) -> frozenset[str]:
    return frozenset(ROLE_GROUPS[g] for g in groups if g in ROLE_GROUPS)


@dataclass
class Env:
    """A verifier over several issuers, all with keys in one JWK-set file."""

    verifier: Verifier
    jwks_path: Path
    rsa: Signer
    ec: Signer
    attacker: Signer
    clock: Clock
    seen_groups: list[list[str]] = field(default_factory=list)

    def claims(self, iss: Any = CI, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "sub": "workload-1",
            "aud": AUDIENCE,
            "iat": int(NOW) - 10,
            "exp": int(NOW) + 300,
            "jti": "jti-1",
        }
        for name, value in {"iss": iss, **overrides}.items():
            if value is DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(self, iss: Any = CI, **overrides: Any) -> str:
        return self.rsa.sign(self.claims(iss, **overrides))


class KeyServer:
    """A real HTTP server on 127.0.0.1 serving JSON documents and counting requests."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: list[str] = []
        self.delay = 0.0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve(self, path: str, document: Any, status: int = 200, **headers: str) -> None:
        self.routes[path] = (status, json.dumps(document).encode(), headers)

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits.count(path)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits.append(self.path)
                time.sleep(server.delay)
                status, body, headers = server.routes.get(self.path, (404, b"{}", {}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
