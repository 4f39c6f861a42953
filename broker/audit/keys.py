"""The audit log's keys in the store: its Ed25519 signing key (with the log's origin, which
names it in every checkpoint) and its HMAC secret (see :mod:`broker.keys.store`)."""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.checkpoint import CheckpointError, NoteSigner
from broker.errors import ConfigError
from broker.keys.store import ACTIVE, AUDIT_HMAC, AUDIT_SIGNING, KeyStore, NewKey, StoredKey

HMAC_BYTES = 32


def signing_kid(key: Ed25519PrivateKey) -> str:
    """The store's id of a log key: the hex SHA-256 of its raw public key."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def stored_signing_key(origin: str, key: Ed25519PrivateKey) -> NewKey:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NewKey(signing_kid(key), ACTIVE, der, label=origin)


def stored_hmac_key(secret: bytes) -> NewKey:
    return NewKey(hashlib.sha256(b"audit-hmac-id" + secret).hexdigest()[:32], ACTIVE, secret)


def _signer(stored: StoredKey) -> NoteSigner:
    try:
        key = serialization.load_der_private_key(stored.secret, password=None)
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PrivateKey) or signing_kid(key) != stored.kid:
        raise ConfigError(f"the audit-signing key {stored.kid} is not the Ed25519 key it names")
    try:
        return NoteSigner(stored.label, key)
    except CheckpointError as exc:
        raise ConfigError(f"the audit log's origin {stored.label!r}: {exc}") from None


def open_signer(keys: KeyStore) -> NoteSigner | None:
    """The log's signer from the store, or None when the store has no log key (read only)."""
    found = keys.find(AUDIT_SIGNING)
    return _signer(found[0]) if found else None


def load_or_create(keys: KeyStore, origin: str) -> tuple[NoteSigner, bytes]:
    """The log's signer and HMAC secret, created in the store when it has none (with
    ``origin``; an existing log keeps the origin it was created with). Raises ConfigError."""
    (signing,), _ = keys.ensure(
        AUDIT_SIGNING, lambda: [stored_signing_key(origin, Ed25519PrivateKey.generate())]
    )
    (secret,), _ = keys.ensure(AUDIT_HMAC, lambda: [stored_hmac_key(os.urandom(HMAC_BYTES))])
    return _signer(signing), secret.secret
