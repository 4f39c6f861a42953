"""The broker's own signing keys (ES256), persisted in the data dir.

The JWKS publishes the current and the previous key, so a rotation has an overlap: tokens signed
just before a rotation keep verifying; after a second rotation the oldest key is gone and every
relying party that refreshes its JWKS stops accepting tokens signed with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.errors import ConfigError
from broker.store.files import write_private_key

ALGORITHM = "ES256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The public JWK with ``kid`` = its RFC 7638 thumbprint."""
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    thumb = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode())
    return {**members, "kid": _b64url(thumb.digest()), "use": "sig", "alg": ALGORITHM}


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    jwk: dict[str, Any]


def _load(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {type(exc).__name__}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"signing key {path} is not an EC P-256 key")
    jwk = public_jwk(key.public_key())
    return SigningKey(kid=jwk["kid"], private=key, jwk=jwk)


class KeyRing:
    """Next, current and previous signing keys in ``<data_dir>/keys/``.

    The JWKS publishes all three. The next key is published one rotation before it signs
    anything, so relying parties that refresh on a schedule, or rate-limit refetches on an
    unknown ``kid``, already hold it when it takes over; the previous key keeps tokens signed
    just before a rotation verifying until the rotation after.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        for name in ("jwt-current.pem", "jwt-next.pem"):
            if not (self._dir / name).exists():
                write_private_key(self._dir / name, ec.generate_private_key(ec.SECP256R1()))
        self._reload()

    def _reload(self) -> None:
        self.current = _load(self._dir / "jwt-current.pem")
        self.next = _load(self._dir / "jwt-next.pem")
        prev = self._dir / "jwt-previous.pem"
        self.previous = _load(prev) if prev.exists() else None
        signers = [self.current] + ([self.previous] if self.previous else [])
        # Only keys that may have signed a broker JWT verify one here (introspection).
        self._by_kid = {k.kid: k for k in signers}
        self._jwks = {"keys": [k.jwk for k in (self.current, self.next, *signers[1:])]}

    def jwks(self) -> dict[str, Any]:
        return self._jwks

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        key = self._by_kid.get(kid)
        return key.private.public_key() if key else None

    @staticmethod
    def new_key() -> SigningKey:
        """A fresh key, not yet installed (so its kid can be logged before it is used)."""
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = public_jwk(private.public_key())
        return SigningKey(kid=jwk["kid"], private=private, jwk=jwk)

    def rotate(self, new: SigningKey) -> None:
        """The next key starts signing, the current one becomes previous, the previous one is
        deleted (tokens it signed stop verifying once relying parties refresh), and ``new`` is
        published as the next key."""
        with self._lock:
            os.replace(self._dir / "jwt-current.pem", self._dir / "jwt-previous.pem")
            os.replace(self._dir / "jwt-next.pem", self._dir / "jwt-current.pem")
            write_private_key(self._dir / "jwt-next.pem", new.private)
            self._reload()
