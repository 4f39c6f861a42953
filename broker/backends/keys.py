"""The broker's own signing keys (ES256), sealed in the store and shared by its replicas.

The JWKS publishes the next, the current and the previous key, so a rotation has an overlap:
tokens signed just before a rotation keep verifying; after a second rotation the oldest key is
gone and every relying party that refreshes its JWKS stops accepting tokens signed with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm
from sqlalchemy.orm import Session

from broker.errors import BrokerError, ConfigError
from broker.jsonbytes import Encoder
from broker.keys.store import CURRENT, JWT, NEXT, PREVIOUS, KeyStore, NewKey, Rotation, StoredKey

log = logging.getLogger("broker.keys")
ALGORITHM = "ES256"
REFRESH_S = 2.0
"""How stale a replica's view of the signing keys may be: a rotation made on another replica is
served here at most this long after (plus one request)."""
UNKNOWN_KID_REFRESH_S = 0.5
"""At most one store read per this interval for tokens whose kid this replica does not know
(a rotation it has not seen yet, or garbage)."""


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_P256_BYTES = 32


def _segment(data: bytes) -> bytes:
    """One segment of a compact JWS: unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64url(data: bytes) -> str:
    return _segment(data).decode()


_JOSE = {
    sort_keys: Encoder(sort_keys=sort_keys, ensure_ascii=True, allow_nan=True)
    for sort_keys in (False, True)
}


def _jose(value: Mapping[str, Any], *, sort_keys: bool = False) -> bytes:
    """A JWS header or JWT payload as PyJWT's ``jwt.encode`` writes it: ``json.dumps`` with
    no spaces (broker.jsonbytes)."""
    return _JOSE[sort_keys].encode(value)


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The public JWK with ``kid`` = its RFC 7638 thumbprint."""
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    thumb = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode())
    return {**members, "kid": _b64url(thumb.digest()), "use": "sig", "alg": ALGORITHM}


def private_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 DER: how an EC private key is sealed in the store."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    jwk: dict[str, Any]
    header: bytes = field(init=False, repr=False, compare=False)
    """The encoded header of every JWT this key signs: ``{"alg","kid","typ":"JWT"}``."""

    def __post_init__(self) -> None:
        if self.private.curve.name != "secp256r1":  # ES256 only: r and s are 32 bytes each
            raise ConfigError(f"the signing key {self.kid} is not an EC P-256 key")
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": "JWT"}
        # Sorted names, as PyJWT writes a header.
        object.__setattr__(self, "header", _segment(_jose(header, sort_keys=True)))

    def sign_jwt(self, claims: Mapping[str, Any]) -> str:
        """``claims`` (JSON values: names, strings, numbers; no datetimes, which PyJWT would
        convert) as a compact JWS signed with this key (RFC 7515 §7.1, ES256: the raw 32-byte
        r and s, RFC 7518 §3.4): what ``jwt.encode`` makes of them with this key's header, byte
        for byte, but for the signature, which ECDSA draws afresh each time.

        NOTE: why (docs/performance.md): this is every broker JWT's signing. PyJWT's encode,
        around the same ECDSA call, checked claim types, merged and encoded the header and made
        a new signature object each time: twice the signature's own cost, measured."""
        signing_input = self.header + b"." + _segment(_jose(claims))
        r, s = decode_dss_signature(self.private.sign(signing_input, _ECDSA_SHA256))
        raw = r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
        return (signing_input + b"." + _segment(raw)).decode("ascii")

    @classmethod
    def of(cls, private: ec.EllipticCurvePrivateKey) -> SigningKey:
        jwk = public_jwk(private.public_key())
        return cls(kid=jwk["kid"], private=private, jwk=jwk)

    @classmethod
    def from_stored(cls, stored: StoredKey, purpose: str = JWT) -> SigningKey:
        """The key a store row holds. Raises ConfigError when it is not an EC P-256 key, or
        not the key its kid names."""
        try:
            key = serialization.load_der_private_key(stored.secret, password=None)
        except ValueError:
            raise ConfigError(f"the {purpose} key {stored.kid} is not a private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"the {purpose} key {stored.kid} is not an EC P-256 key")
        signing = cls.of(key)
        if signing.kid != stored.kid:
            raise ConfigError(f"the {purpose} key {stored.kid} holds the key {signing.kid}")
        return signing

    def stored(self, slot: str) -> NewKey:
        return NewKey(self.kid, slot, private_der(self.private))


@dataclass(frozen=True)
class _Ring:
    generation: int
    current: SigningKey
    next: SigningKey
    previous: SigningKey | None
    by_kid: dict[str, SigningKey]
    jwks: dict[str, Any]
    jwks_json: bytes


def _ring(generation: int, stored: list[StoredKey]) -> _Ring:
    slots = {k.slot: SigningKey.from_stored(k) for k in stored}
    if CURRENT not in slots or NEXT not in slots:
        raise ConfigError("the store's JWT signing keys lack a current or a next key")
    current, nxt, previous = slots[CURRENT], slots[NEXT], slots.get(PREVIOUS)
    signers = [current] + ([previous] if previous else [])
    jwks = {"keys": [k.jwk for k in (current, nxt, *signers[1:])]}
    return _Ring(
        generation=generation,
        current=current,
        next=nxt,
        previous=previous,
        # Only keys that may have signed a broker JWT verify one here (introspection).
        by_kid={k.kid: k for k in signers},
        jwks=jwks,
        jwks_json=json.dumps(jwks, separators=(",", ":")).encode(),
    )


class KeyRing:
    """Next, current and previous signing keys, from the store.

    The JWKS publishes all three. The next key is published one rotation before it signs
    anything, so relying parties that refresh on a schedule, or rate-limit refetches on an
    unknown ``kid``, already hold it when it takes over; the previous key keeps tokens signed
    just before a rotation verifying until the rotation after.

    Every replica reads the same rows, so every replica serves the same JWKS, byte for byte.
    A rotation on any replica reaches this one within :data:`REFRESH_S`: each use checks the
    store's generation counter once that long has passed (one integer read; the keys are
    decrypted only when it moved), and at once (rate-limited) when a token names an unknown
    kid.
    """

    def __init__(
        self,
        keys: KeyStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = REFRESH_S,
    ) -> None:
        """Load the keys, creating them when the store has none. Raises ConfigError."""
        self._keys = keys
        self._clock = clock
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        keys.ensure(JWT, lambda: [SigningKey.of(new_private()).stored(s) for s in (CURRENT, NEXT)])
        self._ring = _ring(*keys.load(JWT))
        self._checked = clock()
        self._unknown_checked = float("-inf")

    # --- the keys, fresh within REFRESH_S ------------------------------------------------------

    def due(self) -> bool:
        """Whether the next use reads the store's generation (REFRESH_S has passed)."""
        return self._clock() - self._checked >= self._refresh_s

    def _fresh(self) -> _Ring:
        # NOTE: a thread that finds another one refreshing goes on with the keys as they are
        # (stale by that one read at most) instead of queueing behind it on the hot path.
        if self._clock() - self._checked >= self._refresh_s and self._lock.acquire(blocking=False):
            try:
                self._refresh()
            finally:
                self._lock.release()
        return self._ring

    @property
    def current(self) -> SigningKey:
        return self._fresh().current

    @property
    def next(self) -> SigningKey:
        return self._fresh().next

    @property
    def previous(self) -> SigningKey | None:
        return self._fresh().previous

    @property
    def generation(self) -> int:
        return self._ring.generation

    def jwks(self) -> dict[str, Any]:
        return self._fresh().jwks

    def jwks_json(self) -> bytes:
        """The JWKS as served: the same bytes on every replica for the same keys."""
        return self._fresh().jwks_json

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        key = self._fresh().by_kid.get(kid)
        if key is None and self._clock() - self._unknown_checked >= UNKNOWN_KID_REFRESH_S:
            self._unknown_checked = self._clock()
            self.refresh()
            key = self._ring.by_kid.get(kid)
        return key.private.public_key() if key else None

    def refresh(self) -> bool:
        """Read the store's generation; when it moved, load the keys. Returns whether they
        changed. A store that cannot be read, or keys that do not open, leave the keys as
        they were (logged): signing and verifying go on with what this replica holds."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        self._checked = self._clock()
        try:
            if self._keys.generation(JWT) == self._ring.generation:
                return False
            generation, stored = self._keys.load(JWT)
            self._ring = _ring(generation, stored)
        except BrokerError as exc:
            log.error("the signing keys were not refreshed from the store: %s", exc)
            return False
        return True

    # --- rotation ------------------------------------------------------------------------------

    @staticmethod
    def new_key() -> SigningKey:
        """A fresh key, not yet installed."""
        return SigningKey.of(new_private())

    def rotate(self, session: Session, new: SigningKey) -> Rotation:
        """In ``session``'s transaction: the next key starts signing, the current one becomes
        previous, the previous one is deleted (tokens it signed stop verifying once relying
        parties refresh), and ``new`` is published as the next key. Returns what moved, as
        the store had it (another replica may have rotated since this one last looked). Call
        :meth:`refresh` after the commit."""
        return self._keys.rotate_jwt(session.connection(), new.stored(NEXT))


def new_private() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
